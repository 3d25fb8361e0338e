"""The stage runner: a build is plain functions over one BuildContext, run in order,
each timed and named, each starting from the stage cache where its inputs allow.

preflight -> bootstrap -> provision -> disk -> formats -> verify -> store
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rockpool import host
from rockpool.build.bootstrap import bootstrap
from rockpool.build.cache import CacheEntry, CachePlan, StageCache, configured_max_bytes
from rockpool.build.context import BuildContext
from rockpool.build.disk import assemble_disk, prepare_root
from rockpool.build.keys import input_digest, stage_keys
from rockpool.build.outputs import is_verified, land, write_formats
from rockpool.build.plan import BuildPlan
from rockpool.build.preflight import preflight
from rockpool.build.provision import provision_with_node_layer
from rockpool.build.rootfs import LISTING, restore, snapshot
from rockpool.build.verify import verify_boot
from rockpool.errors import CommandFailed, RockpoolError
from rockpool.files import link_tree, open_private
from rockpool.formats import output_format
from rockpool.progress import Reporter
from rockpool.spec import ImageSpec
from rockpool.store import Store, Version

log = logging.getLogger("rockpool.build")

LOGS_KEPT = 20
ROOT_TARBALL = "root.tar"

Stage = Callable[[BuildContext], None]


@dataclass(frozen=True)
class BuildResult:
    version: Version | None  # None when the build stopped early (until) and landed nothing
    reused: bool
    log_path: Path | None
    # What each stage of this build did; the manifest of a version that was already
    # stored (the same bytes again) tells its first build's.
    stages: dict[str, str] = field(default_factory=dict)
    stopped_after: str | None = None

    @property
    def landed(self) -> Version:
        if self.version is None:
            raise RockpoolError(f"the build stopped after {self.stopped_after}; nothing landed")
        return self.version

    def to_json(self) -> dict[str, Any]:
        if self.version is None:
            return {
                "stopped_after": self.stopped_after,
                "stages": self.stages,
                "log": str(self.log_path) if self.log_path else None,
            }
        return {
            "image": self.version.ref,
            "name": self.version.name,
            "version": self.version.id,
            "path": str(self.version.path),
            "reused": self.reused,
            "stages": self.stages,
            "log": str(self.log_path) if self.log_path else None,
            "manifest": self.version.manifest,
        }


# ---- the cache-aware stages ---------------------------------------------------------------


def _root_wanted(plan: CachePlan, spec: ImageSpec) -> bool:
    """Whether a format that reads the root tree has no cached output: the build must
    then have the root, so it starts no later than the provisioned root."""
    return any(
        output_format(name).needs_root
        and plan.cache.get("formats", plan.keys.formats[name]) is None
        for name in spec.formats
    )


def cached_preflight(ctx: BuildContext) -> None:
    if ctx.require_cache_plan().covered("preflight"):
        ctx.record("preflight", "skipped")
        return
    preflight(ctx)
    ctx.record("preflight", "built")


def _root_stage(ctx: BuildContext, name: str, work: Stage) -> None:
    """bootstrap or provision: restore the root from the cache, or do the work and keep
    the root's snapshot for the next build."""
    plan = ctx.require_cache_plan()
    if plan.covered(name):
        ctx.record(name, "skipped")
        return
    entry = plan.restores(name)
    if entry is not None:
        restore(entry.file(ROOT_TARBALL), ctx.root)
        plan.release()
        ctx.facts.update(entry.facts)
        ctx.record(name, "cached")
        return
    work(ctx)
    tarball = ctx.work / f"{name}.tar"
    snapshot(ctx.root, tarball)
    facts = {"packages": ctx.facts["packages"]} if name == "provision" else {}
    plan.cache.put(name, plan.keys.of(name), {ROOT_TARBALL: tarball}, facts, scratch=ctx.work)
    tarball.unlink()
    ctx.record(name, "built")


def cached_bootstrap(ctx: BuildContext) -> None:
    _root_stage(ctx, "bootstrap", bootstrap)


def cached_provision(ctx: BuildContext) -> None:
    _root_stage(ctx, "provision", provision_with_node_layer)


def _link_disk(ctx: BuildContext, entry: CacheEntry) -> None:
    link_tree(entry.file(ctx.disk.name), ctx.disk)
    link_tree(entry.file(LISTING), ctx.listing)
    ctx.facts.update(entry.facts)
    ctx.record("disk", "cached")


def cached_disk(ctx: BuildContext) -> None:
    plan = ctx.require_cache_plan()
    entry = plan.restores("disk")
    if entry is not None:
        _link_disk(ctx, entry)
        plan.release()
        return
    if plan.read:
        # The build restored the root only because a format reads it: the cached disk
        # is still good, and the root gets what the disk stage writes into it.
        with plan.cache.locked(exclusive=False):
            cached = plan.cache.get("disk", plan.keys.disk)
            if cached is not None:
                prepare_root(ctx)
                _link_disk(ctx, cached)
                return
    assemble_disk(ctx)
    facts = {key: ctx.facts[key] for key in ("packages", "kernel", "disk")}
    files = {ctx.disk.name: ctx.disk, LISTING: ctx.listing}
    plan.cache.put("disk", plan.keys.disk, files, facts, scratch=ctx.work)
    ctx.record("disk", "built")


STAGES: list[tuple[str, Stage]] = [
    ("preflight", cached_preflight),
    ("bootstrap", cached_bootstrap),
    ("provision", cached_provision),
    ("disk", cached_disk),
    ("formats", write_formats),
    ("verify", verify_boot),
]


# ---- running a build ----------------------------------------------------------------------


class BuildLog(logging.FileHandler):
    """The build's log file. A line it cannot write (the disk is full) is dropped: the
    build's own error says what went wrong, and must not be buried under tracebacks."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def _open_log(store: Store, name: str) -> tuple[Path, logging.Handler]:
    store.ensure_root()
    logs = store.root / "logs"
    logs.mkdir(exist_ok=True)
    for old in sorted(logs.glob("*.log"))[:-LOGS_KEPT]:
        old.unlink(missing_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = logs / f"{stamp}-{name}-{os.getpid()}.log"
    open_private(path, "a").close()  # 0600 before the first line: logs hold command lines
    handler = BuildLog(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    return path, handler


def build(
    spec: ImageSpec,
    store: Store,
    reporter: Reporter,
    *,
    force: bool = False,
    ca_bundle: Path | None = None,
    use_lock: bool = True,
    until: str | None = None,
    verify: bool = True,
) -> BuildResult:
    """Build spec's image, from its lock when it has one (and use_lock is set); with
    until, run the stages up to that one only: their results go to the stage cache, and
    nothing lands."""
    host.require_build_host(spec, verify=verify and until is None)
    plan = BuildPlan.resolve(spec, use_lock=use_lock, ca_bundle=ca_bundle)
    if use_lock and plan.unlocked_but_lockable:
        reporter.info(
            f"{plan.lock_file.name} has no {spec.architecture} entry; building unlocked "
            f"(add one with: rockpool image lock {spec.path})"
        )
    differences = plan.tool_differences()
    if differences:
        reporter.info(
            f"this host's image-writing tools differ from those {plan.lock_file.name} was made "
            f"with ({'; '.join(differences)}): the bytes may differ from the lock's build"
        )
    return build_plan(plan, store, reporter, force=force, until=until, verify=verify)


def build_plan(
    plan: BuildPlan,
    store: Store,
    reporter: Reporter,
    *,
    force: bool = False,
    until: str | None = None,
    verify: bool = True,
) -> BuildResult:
    """Run the standard stages of plan through the stage cache, then prune the cache."""
    cache = StageCache.of_store(store.root)
    max_bytes = configured_max_bytes()
    result = run_build(
        plan,
        store,
        reporter,
        STAGES,
        digest=input_digest(plan),
        force=force,
        cache=cache,
        until=until,
        verify=verify,
    )
    for entry in cache.prune(max_bytes):
        log.info("cache: pruned %s %s (over %d bytes)", entry.stage, entry.key, max_bytes)
    return result


def run_build(
    plan: BuildPlan,
    store: Store,
    reporter: Reporter,
    stages: Sequence[tuple[str, Stage]],
    *,
    digest: str,
    force: bool,
    epoch: Callable[[], int] | None = None,
    cache: StageCache | None = None,
    until: str | None = None,
    verify: bool = True,
) -> BuildResult:
    """Reuse the version built from the same inputs, or run the stages in a staging
    directory, each timed and logged, and land what they wrote in the store.

    epoch gives the build's SOURCE_DATE_EPOCH where the plan's does not apply (the
    Packer path). With a cache, each stage starts from the latest cached result its
    inputs allow; force ignores both the stored version and the cache."""
    spec = plan.spec
    store.repair_latest(spec.name)
    if until is not None:
        names = [name for name, _ in stages]
        stages = stages[: names.index(until) + 1]
    elif not force:
        existing = store.find_by_input(spec.name, digest)
        if existing is not None and verify and not is_verified(existing):
            reporter.info(f"{existing.ref} has the same inputs but was never booted; verifying")
            existing = None
        if existing is not None:
            reporter.info(f"{existing.ref} is up to date (same inputs); use --force to rebuild")
            return BuildResult(existing, reused=True, log_path=None)

    log_path, handler = _open_log(store, spec.name)
    root_logger = logging.getLogger("rockpool")
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    started = time.monotonic()
    try:
        with store.staging() as work:
            ctx = BuildContext(
                plan=plan,
                store=store,
                work=work,
                reporter=reporter,
                input_digest=digest,
                source_date_epoch=plan.epoch_or(epoch),
                log_path=log_path,
                verify=verify,
            )
            log.info("building %s from %s (input %s) in %s", spec.name, spec.path, digest, work)
            if cache is not None:
                keys = stage_keys(plan, ctx.source_date_epoch)
                ctx.cache_plan = CachePlan(cache, keys, read=not force)
                ctx.cache_plan.find_start(until, need_root=_root_wanted(ctx.cache_plan, spec))
            try:
                for name, stage in stages:
                    with ctx.stage(name):
                        stage(ctx)
            finally:
                if ctx.cache_plan is not None:
                    ctx.cache_plan.release()
            if until is not None:
                reporter.info(f"stopped after {until}; its result is in the stage cache")
                return BuildResult(
                    None, False, log_path, ctx.facts.get("stages", {}), stopped_after=until
                )
            with ctx.stage("store"):
                version = land(ctx, started)
    except CommandFailed as exc:
        exc.hint = f"full build log: {log_path}"
        raise
    except RockpoolError as exc:
        exc.hint = exc.hint or f"full build log: {log_path}"
        raise
    finally:
        root_logger.removeHandler(handler)
        handler.close()
    if version.manifest["input_digest"] == digest:
        reporter.info(f"built {version.ref} in {version.manifest['build_seconds']:.0f}s")
    else:
        reporter.info(f"built {version.ref}: the same bytes as the version already stored")
    return BuildResult(version, reused=False, log_path=log_path, stages=ctx.facts.get("stages", {}))

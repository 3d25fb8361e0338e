"""The build pipeline: plain functions over a BuildContext, each stage timed and named.

preflight -> bootstrap -> provision -> disk -> formats -> store
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rockpool
from rockpool import host
from rockpool.build.bootstrap import bootstrap, bootstrap_packages
from rockpool.build.cache import (
    CACHED_STAGES,
    CachePlan,
    StageCache,
    StageKeys,
    configured_max_bytes,
)
from rockpool.build.context import BuildContext
from rockpool.build.disk import assemble_disk
from rockpool.build.preflight import archive_epoch, preflight, registry_integrity
from rockpool.build.provision import provision, setup_variables
from rockpool.build.rootfs import LISTING, restore, snapshot
from rockpool.build.verify import verify_boot
from rockpool.errors import CommandFailed, InvalidInput, RockpoolError
from rockpool.files import copy_private, link_tree, open_private, sha256_file
from rockpool.formats import OutputFormat, output_format
from rockpool.lock import Lock, check_inputs, lock_path, locked_inputs, read_lock, write_lock
from rockpool.progress import Reporter
from rockpool.spec import ImageSpec, spec_digest
from rockpool.store import Store, Version, is_plain_file_name

log = logging.getLogger("rockpool.build.pipeline")

LOGS_KEPT = 20
# The modules whose code shapes each stage's result: a change to one is a new input.
STAGE_MODULES = {
    "bootstrap": ("bootstrap.py",),
    "provision": ("provision.py",),
    "disk": ("disk.py", "rootfs.py", "context.py"),
    "formats": ("formats/*.py",),
}
_PIPELINE_MODULES = tuple(pattern for patterns in STAGE_MODULES.values() for pattern in patterns)
ROOT_TARBALL = "root.tar"


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


def _module_digests(patterns: Sequence[str]) -> list[str]:
    package_dir = Path(rockpool.__file__).parent
    modules = sorted(path for pattern in patterns for path in package_dir.glob(pattern))
    return [hashlib.sha256(module.read_bytes()).hexdigest() for module in modules]


def input_digest(spec: ImageSpec, lock: Lock | None = None) -> str:
    locked = [json.dumps(lock.to_json(), sort_keys=True)] if lock is not None else []
    return spec_digest(spec, *_module_digests(_PIPELINE_MODULES), *locked)


def _digest(stage: str, **inputs: Any) -> str:
    payload = {"stage": stage, "code": _module_digests(STAGE_MODULES[stage]), **inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def stage_keys(spec: ImageSpec, epoch: int, lock: Lock | None) -> StageKeys:
    """Each stage's inputs, chained: a change reaches the stage it affects and those after.

    Mirrors count only without a lock: a locked build installs the same versions from
    any mirror that has them."""
    bootstrap_key = _digest(
        "bootstrap",
        architecture=spec.architecture,
        suite=spec.suite,
        mirrors=None if lock else [spec.mirror, spec.security_mirror],
        packages=bootstrap_packages(spec),
        locked=lock.debian if lock else None,
        source_date_epoch=epoch,
    )
    provision_key = _digest(
        "provision",
        after=bootstrap_key,
        setup_script=hashlib.sha256(spec.setup_script.read_bytes()).hexdigest(),
        variables=setup_variables(spec),
        locked=[lock.npm, lock.npm_tree] if lock else None,
    )
    disk_key = _digest(
        "disk", after=provision_key, name=spec.name, suite=spec.suite, size=spec.disk_size
    )
    section = runtime_section(spec)
    runtime_key = (
        _digest(
            "provision",
            after=bootstrap_key,
            layer="runtime",
            script=[hashlib.sha256(part.encode()).hexdigest() for part in section],
            variables=setup_variables(spec),
            locked=lock.npm if lock else None,
        )
        if section
        else None
    )
    formats = {
        name: _digest("formats", after=disk_key, format=name, cpus=spec.cpus, memory=spec.memory)
        for name in spec.formats
    }
    return StageKeys(bootstrap_key, provision_key, disk_key, formats, runtime_key)


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


def file_digests(path: Path, known: dict[tuple[int, int], str]) -> dict[str, str]:
    """sha256 of a file, or of each file below a directory, by relative path.

    known maps (device, inode) to digests already computed, so a hard link to the raw
    disk (Tart's disk.img) is not read again.
    """
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digests = {}
    for member in files:
        stat = member.stat()
        key = (stat.st_dev, stat.st_ino)
        if key not in known:
            known[key] = sha256_file(member)
        digests[member.relative_to(path).as_posix() if member != path else ""] = known[key]
    return digests


def output_digest(path: Path, known: dict[tuple[int, int], str]) -> str:
    """sha256 of a file, or of a directory's sorted (path, sha256) listing."""
    digests = file_digests(path, known)
    if path.is_file():
        return digests[""]
    listing = "".join(f"{name}\0{digest}\n" for name, digest in digests.items())
    return hashlib.sha256(listing.encode()).hexdigest()


def _allocated(path: Path) -> tuple[int, int]:
    """(apparent size, bytes allocated) of a file or of every file below a directory."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    stats = [f.stat() for f in files]
    return sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats)


def write_formats(ctx: BuildContext, backends: Mapping[str, OutputFormat] | None = None) -> None:
    """Write the spec's formats from ctx.disk; backends replaces the standard backend of a
    format (the Packer path's "tart" is the VM Tart built, nvram.bin included)."""
    out = ctx.outputs_dir
    out.mkdir()
    outputs: dict[str, Any] = {}
    plan = ctx.cache_plan
    # Hash the raw disk on the second core while the formats are written.
    with ThreadPoolExecutor(max_workers=1) as pool:
        raw_digest = pool.submit(sha256_file, ctx.disk)
        for name in ctx.spec.formats:
            key = plan.keys.formats[name] if plan is not None else None
            if plan and plan.read and key and _link_cached_format(ctx, plan, key, outputs, name):
                _record(ctx, f"formats/{name}", "cached")
                continue
            backend = (backends or {}).get(name) or output_format(name)
            log.info("format %s: writing", name)
            written = backend.write(ctx, ctx.disk, out)
            outputs[name] = {"file": written.path.name}
            if plan is not None and key is not None:
                plan.cache.put(
                    "formats",
                    key,
                    {written.path.name: written.path},
                    {"file": written.path.name, "format": name},
                    scratch=ctx.work,
                )
                _record(ctx, f"formats/{name}", "built")
        disk = ctx.disk.stat()
        known = {(disk.st_dev, disk.st_ino): raw_digest.result()}
        for entry in outputs.values():
            path = out / entry["file"]
            size, allocated = _allocated(path)
            entry.update(
                {"size": size, "allocated": allocated, "sha256": output_digest(path, known)}
            )
            if path.is_dir():
                entry["files"] = file_digests(path, known)
    ctx.facts["outputs"] = outputs


def _link_cached_format(
    ctx: BuildContext, plan: CachePlan, key: str, outputs: dict[str, Any], name: str
) -> bool:
    """Link a format's cached output into the version, if the cache has it."""
    with plan.cache.locked(exclusive=False):  # no prune between the check and the link
        entry = plan.cache.get("formats", key)
        if entry is None:
            return False
        file_name = str(entry.facts["file"])
        if not is_plain_file_name(file_name):
            return False
        link_tree(entry.file(file_name), ctx.outputs_dir / file_name)
    outputs[name] = {"file": file_name}
    return True


def land(ctx: BuildContext, started: float) -> Version:
    outputs = ctx.facts["outputs"]
    version_id = hashlib.sha256(
        "".join(f"{n}:{o['sha256']}" for n, o in sorted(outputs.items())).encode()
    ).hexdigest()[:12]
    copy_private(ctx.log_path, ctx.outputs_dir / "build.log")
    if ctx.listing.is_file():
        shutil.copyfile(ctx.listing, ctx.outputs_dir / LISTING)
    manifest = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "rockpool_version": rockpool.__version__,
        "input_digest": ctx.input_digest,
        "source_date_epoch": ctx.source_date_epoch,
        "architecture": ctx.spec.architecture,
        "suite": ctx.spec.suite,
        "user": ctx.spec.user,
        "spec": ctx.spec.to_json(),
        "builder": ctx.facts.get("builder", {"name": "mmdebstrap"}),
        "packages": ctx.facts.get("packages", {}),
        "kernel": ctx.facts.get("kernel"),
        "disk": ctx.facts.get("disk", {}),
        "outputs": outputs,
        "stages": ctx.facts.get("stages", {}),
        "verification": ctx.facts.get(
            "verification", {"verified": False, "skipped": "this builder does not boot-verify"}
        ),
        "stage_seconds": ctx.stage_seconds,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    return ctx.store.land(ctx.spec.name, version_id, ctx.outputs_dir, manifest)


def is_verified(version: Version) -> bool:
    verification = version.manifest.get("verification")
    return isinstance(verification, dict) and verification.get("verified") is True


Stage = Callable[[BuildContext], None]


def _record(ctx: BuildContext, stage: str, result: str) -> None:
    """What a stage did: "built", "cached" (restored from the stage cache) or "skipped"
    (a later stage's cached result already holds its work)."""
    ctx.facts.setdefault("stages", {})[stage] = result
    if result != "built":
        ctx.reporter.info(f"{stage}: {result}")


def _plan(ctx: BuildContext) -> CachePlan:
    assert ctx.cache_plan is not None, "the mmdebstrap stages run with a cache plan"
    return ctx.cache_plan


def cached_preflight(ctx: BuildContext) -> None:
    if _plan(ctx).covered("preflight"):
        _record(ctx, "preflight", "skipped")
        return
    preflight(ctx)
    _record(ctx, "preflight", "built")


# setup.sh's section that installs Node.js, npm and code-server, and what it installs.
RUNTIME_SECTION = ("# ---- Node.js and npm from the npm registry", "# ---- workspace user")
RUNTIME_PATHS = (
    "usr/local/bin/node",
    "usr/local/bin/npm",
    "usr/local/bin/npx",
    "usr/local/bin/code-server",
    "usr/local/include/node",
    "usr/local/lib/node_modules",
)
RUNTIME_TARBALL = "runtime.tar"


def runtime_section(spec: ImageSpec) -> tuple[str, str] | None:
    """setup.sh's settings and helpers, and its Node.js-to-code-server section; None
    when the script has no such marked section."""
    text = spec.setup_script.read_text(encoding="utf-8")
    start, end = (text.find(marker) for marker in RUNTIME_SECTION)
    first_section = text.find("# ---- ")
    if min(start, end, first_section) < 0 or end < start:
        return None
    return text[:first_section], text[start:end]


def provision_with_runtime_layer(ctx: BuildContext) -> None:
    """Run setup.sh on a root that already holds Node.js, npm and code-server when an
    earlier build installed them from the same inputs: setup.sh finds them in place and
    skips its slowest part (compiling code-server's native modules)."""
    plan = _plan(ctx)
    key = plan.keys.runtime
    with plan.cache.locked(exclusive=False):  # no prune between the check and the restore
        entry = plan.cache.get("runtime", key) if plan.read and key else None
        if entry is not None:
            restore(entry.file(RUNTIME_TARBALL), ctx.root)
    provision(ctx)
    if key is None:
        return
    _record(ctx, "provision/runtime", "cached" if entry else "built")
    if entry is None:
        present = [path for path in RUNTIME_PATHS if os.path.lexists(ctx.root / path)]
        if present:
            tarball = ctx.work / RUNTIME_TARBALL
            snapshot(ctx.root, tarball, present)
            plan.cache.put("runtime", key, {RUNTIME_TARBALL: tarball}, {}, scratch=ctx.work)
            tarball.unlink()


def _root_stage(ctx: BuildContext, name: str, work: Stage) -> None:
    """bootstrap or provision: restore the root from the cache, or do the work and keep
    the root's snapshot for the next build."""
    plan = _plan(ctx)
    if plan.covered(name):
        _record(ctx, name, "skipped")
        return
    entry = plan.restores(name)
    if entry is not None:
        restore(entry.file(ROOT_TARBALL), ctx.root)
        plan.release()
        ctx.facts.update(entry.facts)
        _record(ctx, name, "cached")
        return
    work(ctx)
    tarball = ctx.work / f"{name}.tar"
    snapshot(ctx.root, tarball)
    facts = {"packages": ctx.facts["packages"]} if name == "provision" else {}
    plan.cache.put(name, plan.keys.of(name), {ROOT_TARBALL: tarball}, facts, scratch=ctx.work)
    tarball.unlink()
    _record(ctx, name, "built")


def cached_bootstrap(ctx: BuildContext) -> None:
    _root_stage(ctx, "bootstrap", bootstrap)


def cached_provision(ctx: BuildContext) -> None:
    _root_stage(ctx, "provision", provision_with_runtime_layer)


def cached_disk(ctx: BuildContext) -> None:
    plan = _plan(ctx)
    entry = plan.restores("disk")
    if entry is not None:
        link_tree(entry.file(ctx.disk.name), ctx.disk)
        link_tree(entry.file(LISTING), ctx.listing)
        plan.release()
        ctx.facts.update(entry.facts)
        _record(ctx, "disk", "cached")
        return
    assemble_disk(ctx)
    facts = {key: ctx.facts[key] for key in ("packages", "kernel", "disk")}
    files = {ctx.disk.name: ctx.disk, LISTING: ctx.listing}
    plan.cache.put("disk", plan.keys.disk, files, facts, scratch=ctx.work)
    _record(ctx, "disk", "built")


STAGES: list[tuple[str, Stage]] = [
    ("preflight", cached_preflight),
    ("bootstrap", cached_bootstrap),
    ("provision", cached_provision),
    ("disk", cached_disk),
    ("formats", write_formats),
    ("verify", verify_boot),
]


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
    bundle = checked_ca_bundle(ca_bundle) if ca_bundle else default_ca_bundle()
    cache = StageCache.of_store(store.root)
    max_bytes = configured_max_bytes()
    lock = read_lock(spec) if use_lock else None
    if lock is not None:
        check_inputs(lock, locked_inputs(spec, bootstrap_packages(spec)))
    elif use_lock and lock_path(spec).is_file():
        reporter.info(
            f"{lock_path(spec).name} has no {spec.architecture} entry; building unlocked "
            f"(add one with: rockpool image lock {spec.path})"
        )
    result = run_build(
        spec,
        store,
        reporter,
        STAGES,
        digest=input_digest(spec, lock),
        force=force,
        ca_bundle=bundle,
        epoch=(lambda: lock.source_date_epoch) if lock else (lambda: archive_epoch(spec, bundle)),
        cache=cache,
        lock=lock,
        until=until,
        verify=verify,
    )
    for entry in cache.prune(max_bytes):
        log.info("cache: pruned %s %s (over %d bytes)", entry.stage, entry.key, max_bytes)
    return result


def lock_spec(
    spec: ImageSpec, store: Store, reporter: Reporter, *, ca_bundle: Path | None = None
) -> tuple[Path, BuildResult]:
    """Resolve spec against today's archive and registry, and write what it resolved to
    as its lock.

    The resolving build runs unlocked, through the stage cache; its cached results are
    filed under the locked build's keys too, so the first locked build starts from them.
    """
    result = build(spec, store, reporter, ca_bundle=ca_bundle, use_lock=False)
    bundle = checked_ca_bundle(ca_bundle) if ca_bundle else default_ca_bundle()
    manifest = result.landed.manifest
    installed = manifest["packages"]
    npm = {
        name: {
            "version": version,
            "integrity": registry_integrity(spec, name, version, bundle),
        }
        for name, version in installed.get("npm", {}).items()
    }
    epoch = int(manifest["source_date_epoch"])
    lock = Lock(
        path=lock_path(spec),
        architecture=spec.architecture,
        source_date_epoch=epoch,
        inputs=locked_inputs(spec, bootstrap_packages(spec)),
        debian=installed["debian"],
        npm=npm,
        npm_tree=installed.get("npm_tree", {}),
    )
    path = write_lock(spec, lock)
    cache = StageCache.of_store(store.root)
    unlocked, locked = stage_keys(spec, epoch, None), stage_keys(spec, epoch, lock)
    with store.staging() as scratch:
        for stage in CACHED_STAGES:
            cache.alias(stage, unlocked.of(stage), locked.of(stage), scratch=scratch)
        for name, key in unlocked.formats.items():
            cache.alias("formats", key, locked.formats[name], scratch=scratch)
        if unlocked.runtime and locked.runtime:
            cache.alias("runtime", unlocked.runtime, locked.runtime, scratch=scratch)
    return path, result


def run_build(
    spec: ImageSpec,
    store: Store,
    reporter: Reporter,
    stages: Sequence[tuple[str, Stage]],
    *,
    digest: str,
    force: bool,
    ca_bundle: Path | None = None,
    epoch: Callable[[], int] = lambda: int(time.time()),
    cache: StageCache | None = None,
    lock: Lock | None = None,
    until: str | None = None,
    verify: bool = True,
) -> BuildResult:
    """Reuse the version built from the same inputs, or run the stages in a staging
    directory, each timed and logged, and land what they wrote in the store.

    epoch gives the build's SOURCE_DATE_EPOCH unless the environment sets one. With a
    cache, each stage starts from the latest cached result its inputs allow; force
    ignores both the stored version and the cache."""
    override = source_date_epoch_override()
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
                spec=spec,
                store=store,
                work=work,
                reporter=reporter,
                input_digest=digest,
                source_date_epoch=override if override is not None else epoch(),
                log_path=log_path,
                ca_bundle=ca_bundle,
                lock=lock,
                verify=verify,
            )
            log.info("building %s from %s (input %s) in %s", spec.name, spec.path, digest, work)
            if cache is not None:
                keys = stage_keys(spec, ctx.source_date_epoch, lock)
                ctx.cache_plan = CachePlan(cache, keys, read=not force)
                ctx.cache_plan.find_start(until)
            # Load every format backend now: a build runs for up to an hour and a half,
            # and must not import code that was changed on disk meanwhile.
            for name in spec.formats:
                output_format(name)
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

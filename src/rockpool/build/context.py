"""The build context: the plan a build follows, its working directory, what its stages
found out (facts, stage results) and stage timing."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rockpool.build.cache import CachePlan
from rockpool.build.plan import BuildPlan
from rockpool.formats import FormatJob
from rockpool.lock import Lock
from rockpool.progress import Reporter
from rockpool.spec import ImageSpec
from rockpool.store import Store

log = logging.getLogger("rockpool.build")


@dataclass(frozen=True)
class DiskIdentity:
    """GUIDs and ids of the disk, derived from the build's inputs so that the same
    inputs give the same disk."""

    disk_guid: str
    esp_guid: str
    root_guid: str
    root_fs_uuid: str
    root_hash_seed: str
    esp_volume_id: str

    @classmethod
    def derive(cls, seed: str) -> DiskIdentity:
        def derived(purpose: str) -> str:
            return str(uuid.uuid5(uuid.NAMESPACE_URL, f"rockpool:{seed}:{purpose}"))

        return cls(
            disk_guid=derived("disk"),
            esp_guid=derived("esp"),
            root_guid=derived("root-partition"),
            root_fs_uuid=derived("root-fs"),
            root_hash_seed=derived("root-hash-seed"),
            esp_volume_id=derived("esp-volume")[:8].upper(),
        )


def identity_seed(spec: ImageSpec) -> str:
    """What the disk's ids and the Tart MAC derive from: the image, not its inputs, so
    that a setup.sh change, a new format or a lock of the same versions gives the same
    bytes, while two images never share a filesystem UUID."""
    return f"{spec.name}:{spec.architecture}:{spec.disk_size}"


@dataclass
class BuildContext:
    plan: BuildPlan
    store: Store
    work: Path
    reporter: Reporter
    input_digest: str
    source_date_epoch: int
    log_path: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    cache_plan: CachePlan | None = None
    verify: bool = True  # boot the image before it lands (verify.py)

    @property
    def spec(self) -> ImageSpec:
        return self.plan.spec

    @property
    def lock(self) -> Lock | None:
        return self.plan.lock

    @property
    def ca_bundle(self) -> Path | None:
        return self.plan.ca_bundle

    @property
    def identity_seed(self) -> str:
        return identity_seed(self.spec)

    @property
    def identity(self) -> DiskIdentity:
        return DiskIdentity.derive(self.identity_seed)

    @property
    def root(self) -> Path:
        return self.work / "root"

    @property
    def disk(self) -> Path:
        return self.work / "disk.raw"

    @property
    def outputs_dir(self) -> Path:
        return self.work / "version"

    @property
    def listing(self) -> Path:
        """The root filesystem's file listing (rootfs.LISTING), for `image diff`."""
        return self.work / "rootfs.json.gz"

    def format_job(self) -> FormatJob:
        """What the output formats need of this build."""
        spec = self.spec
        return FormatJob(
            image=spec.name,
            description=spec.description,
            suite=spec.suite,
            architecture=spec.architecture,
            cpus=spec.cpus,
            memory=spec.memory,
            identity_seed=self.identity_seed,
            source_date_epoch=self.source_date_epoch,
            reporter=self.reporter,
            raw_disk=self.disk,
            out_dir=self.outputs_dir,
            work=self.work,
            root=self.root if (self.root / "usr").is_dir() else None,
        )

    def require_cache_plan(self) -> CachePlan:
        assert self.cache_plan is not None, "the mmdebstrap stages run with a cache plan"
        return self.cache_plan

    def record(self, stage: str, result: str) -> None:
        """What a stage did: "built", "cached" (restored from the stage cache) or
        "skipped" (a later stage's cached result already holds its work)."""
        self.facts.setdefault("stages", {})[stage] = result
        if result != "built":
            self.reporter.info(f"{stage}: {result}")

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        log.info("stage %s: started", name)
        with self.reporter.stage(name):
            yield
        self.stage_seconds[name] = round(time.monotonic() - started, 2)
        log.info("stage %s: done in %.1fs", name, self.stage_seconds[name])

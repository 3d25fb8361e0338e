"""Stage formats, and the landing: the outputs written from the disk (or linked from
the stage cache), their digests, the manifest, and one atomic move into the store."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import rockpool
from rockpool import host
from rockpool.build.cache import CachePlan
from rockpool.build.context import BuildContext
from rockpool.build.keys import all_stage_code, code_files
from rockpool.build.rootfs import LISTING
from rockpool.files import copy_private, link_tree, sha256_chunks, sha256_file
from rockpool.formats import OutputFormat, output_format
from rockpool.store import Version, is_plain_file_name

log = logging.getLogger("rockpool.build")


# Raw disks, 20 GiB of mostly holes: digested by their allocated 4 MiB chunks
# (files.sha256_chunks), every other file whole.
DISK_FILES = ("disk.raw", "disk.img")
DISK_DIGEST = "sha256-4MiB-chunks"

Digests = dict[tuple[int, int], str]


def file_digest(path: Path, known: Digests) -> str:
    """path's digest; known maps (device, inode) to digests already computed, so a hard
    link to the raw disk (Tart's disk.img) is not read again."""
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino)
    if key not in known:
        known[key] = sha256_chunks(path) if path.name in DISK_FILES else sha256_file(path)
    return known[key]


def file_digests(path: Path, known: Digests) -> dict[str, str]:
    """The digest of a file, or of each file below a directory, by relative path."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        member.relative_to(path).as_posix() if member != path else "": file_digest(member, known)
        for member in files
    }


def output_digest(path: Path, known: Digests) -> str:
    """A file's digest, or a sha256 of a directory's sorted (path, digest) listing."""
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


def _describe(path: Path, known: Digests) -> dict[str, Any]:
    """What the manifest records of one output."""
    size, allocated = _allocated(path)
    entry: dict[str, Any] = {
        "file": path.name,
        "size": size,
        "allocated": allocated,
        "sha256": output_digest(path, known),
    }
    if path.name in DISK_FILES:
        entry["digest"] = DISK_DIGEST
    if path.is_dir():
        entry["files"] = file_digests(path, known)
    return entry


def write_formats(ctx: BuildContext, backends: Mapping[str, OutputFormat] | None = None) -> None:
    """Write the spec's formats from ctx.disk, all at once: each writer is a program or
    threads that leave the GIL (qemu-img compresses on one core, mksquashfs and the
    tart-oci writer on the rest), so together they use every core. backends replaces
    the standard backend of a format (the Packer path's "tart" is the VM Tart built,
    nvram.bin included)."""
    out = ctx.outputs_dir
    out.mkdir()
    plan = ctx.cache_plan
    job = ctx.format_job()
    disk = ctx.disk.stat()
    files: dict[str, str] = {}
    to_write = []
    for name in ctx.spec.formats:
        key = plan.keys.formats[name] if plan is not None else None
        if plan and plan.read and key and (cached := _link_cached_format(ctx, plan, key)):
            files[name] = cached
            ctx.record(f"formats/{name}", "cached")
        else:
            to_write.append(name)
    with ThreadPoolExecutor(max_workers=len(to_write) + 1) as pool:
        raw_digest = pool.submit(sha256_chunks, ctx.disk)

        def write(name: str) -> str:
            backend = (backends or {}).get(name) or output_format(name)
            log.info("format %s: writing", name)
            written = backend.write(job)
            if plan is not None:
                plan.cache.put(
                    "formats",
                    plan.keys.formats[name],
                    {written.path.name: written.path},
                    {"file": written.path.name, "format": name},
                    scratch=ctx.work,
                    known={(disk.st_dev, disk.st_ino): raw_digest.result()},
                )
                ctx.record(f"formats/{name}", "built")
            return written.path.name

        writers = {name: pool.submit(write, name) for name in to_write}
        files.update({name: future.result() for name, future in writers.items()})
        known: Digests = {(disk.st_dev, disk.st_ino): raw_digest.result()}
        described = pool.map(lambda name: _describe(out / files[name], known), files)
        outputs = dict(zip(files, described, strict=True))
    ctx.facts["outputs"] = {name: outputs[name] for name in ctx.spec.formats}


def _link_cached_format(ctx: BuildContext, plan: CachePlan, key: str) -> str | None:
    """Link a format's cached output into the version, if the cache has it: its name."""
    with plan.cache.locked(exclusive=False):  # no prune between the check and the link
        entry = plan.cache.get("formats", key)
        if entry is None:
            return None
        file_name = str(entry.facts["file"])
        if not is_plain_file_name(file_name):
            return None
        link_tree(entry.file(file_name), ctx.outputs_dir / file_name)
    return file_name


def version_id(outputs: Mapping[str, Any]) -> str:
    """A version is named by its outputs' bytes: the same bytes, the same version."""
    return hashlib.sha256(
        "".join(f"{n}:{o['sha256']}" for n, o in sorted(outputs.items())).encode()
    ).hexdigest()[:12]


# What a version records of its inputs beside its manifest, so that `rockpool image
# verify` can rebuild it anywhere: setup.sh as it ran and the lock entry it was built
# from. And what npm resolved: the lockfiles `rockpool image lock` keeps.
INPUTS_DIR = "inputs"
RECORDED_SETUP = "setup.sh"
RECORDED_LOCK = "lock.json"
NPM_LOCKFILES = "npm-lockfiles.json"


def resolved_lockfiles(version: Version) -> dict[str, Any]:
    path = version.path / NPM_LOCKFILES
    if not path.is_file():
        return {}
    lockfiles: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return lockfiles


def _record_inputs(ctx: BuildContext) -> None:
    inputs = ctx.outputs_dir / INPUTS_DIR
    inputs.mkdir()
    (inputs / RECORDED_SETUP).write_text(ctx.plan.setup.text, encoding="utf-8")
    if ctx.lock is not None:
        entry = {"architecture": ctx.lock.architecture, **ctx.lock.to_json()}
        (inputs / RECORDED_LOCK).write_text(json.dumps(entry, indent=1) + "\n")
    lockfiles = ctx.facts.get("packages", {}).get("npm_lockfiles")
    if lockfiles:
        (ctx.outputs_dir / NPM_LOCKFILES).write_text(json.dumps(lockfiles, indent=1) + "\n")


def manifest(ctx: BuildContext, started: float) -> dict[str, Any]:
    packages = {
        kind: listed
        for kind, listed in ctx.facts.get("packages", {}).items()
        if kind != "npm_lockfiles"  # beside the manifest, in NPM_LOCKFILES
    }
    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "rockpool_version": rockpool.__version__,
        "input_digest": ctx.input_digest,
        "source_date_epoch": ctx.source_date_epoch,
        "architecture": ctx.spec.architecture,
        "suite": ctx.spec.suite,
        "user": ctx.spec.user,
        "spec": ctx.spec.to_json(),
        "builder": ctx.facts.get("builder", {"name": "mmdebstrap"}),
        "packages": packages,
        "kernel": ctx.facts.get("kernel"),
        "disk": ctx.facts.get("disk", {}),
        "outputs": ctx.facts["outputs"],
        "stages": ctx.facts.get("stages", {}),
        "verification": ctx.facts.get(
            "verification", {"verified": False, "skipped": "this builder does not boot-verify"}
        ),
        "inputs": {
            "setup_script": ctx.plan.setup.sha256,
            "locked": ctx.lock is not None,
            "code": code_files(all_stage_code()),
        },
        "build_host": {
            **host.build_host_facts(),
            "tools": ctx.plan.host_tools,
            # The packages of the native cross compiler of this build's modules, if any.
            **({"cross_compiler": cross} if (cross := ctx.facts.get("cross_compiler")) else {}),
        },
        "stage_seconds": ctx.stage_seconds,
        "build_seconds": round(time.monotonic() - started, 1),
    }


def land(ctx: BuildContext, started: float) -> Version:
    copy_private(ctx.log_path, ctx.outputs_dir / "build.log")
    _record_inputs(ctx)
    if ctx.listing.is_file():
        shutil.copyfile(ctx.listing, ctx.outputs_dir / LISTING)
    return ctx.store.land(
        ctx.spec.name, version_id(ctx.facts["outputs"]), ctx.outputs_dir, manifest(ctx, started)
    )


def is_verified(version: Version) -> bool:
    verification = version.manifest.get("verification")
    return isinstance(verification, dict) and verification.get("verified") is True

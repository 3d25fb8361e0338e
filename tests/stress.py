"""Concurrent operations against one store, as Rockpool's worker issues them from many
requests at once; then a check that nothing was lost.

N worker processes each run random operations through the real CLI: workspace create,
clone, rm, start, stop, status and ls; image rm and gc; a build's landing (a new
version, through Store.land); cache puts and prunes. Before each clone the worker
writes a pattern into the source's disk (qemu-io, under the workspace's own lock);
afterwards every workspace that still has the identity it had then must read it back.

    python -m tests.stress --store DIR [--workers 4] [--ops 200] [--seed 1]

prints a JSON report and exits 1 if any check failed. tests/e2e/test_stress.py runs it
with bounded counts; RELIABILITY.md has the soak command.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rockpool.build.cache import StageCache
from rockpool.runtime.qemu import QemuRuntime
from rockpool.store import Store
from tests.small_image import land_small_image

REPO = Path(__file__).resolve().parents[1]
NAMES = [f"w{i}" for i in range(16)]
BLOCK = 4096
DISK_SLOTS = (64 << 20) // BLOCK  # the small image's disk, in blocks
# The exit codes each operation may end with when it races others; anything else (an
# internal error, exit 1, or a traceback) is a failure.
ALLOWED = {
    "create": {0, 3, 6},
    "clone": {0, 3, 6},
    "rm": {0, 3, 6},
    "start": {0, 3},
    "stop": {0, 3},
    "status": {0, 3},
    "ls": {0},
    "image-rm": {0, 3, 6},
    "gc": {0},
    "land": {0},
    "cache-put": {0},
    "cache-prune": {0},
}
WEIGHTS = {
    "create": 20,
    "clone": 15,
    "rm": 10,
    "start": 7,
    "stop": 8,
    "status": 4,
    "ls": 3,
    "image-rm": 5,
    "gc": 7,
    "land": 6,
    "cache-put": 4,
    "cache-prune": 3,
}


def cli(store: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rockpool", "-q", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "ROCKPOOL_HOME": str(store), "PYTHONPATH": str(REPO / "src")},
        timeout=timeout,
    )


def land(store: Path) -> int:
    """A build's landing: a new version, through the real Store.land."""
    land_small_image(Store(store))
    return 0


def cache_put(store: Path) -> int:
    """A build's cache put, from a build directory as a build has one."""
    with Store(store).staging() as scratch:
        tarball = scratch / "root.tar"
        tarball.write_bytes(os.urandom(65536))
        key = hashlib.sha256(os.urandom(16)).hexdigest()
        StageCache.of_store(store).put("bootstrap", key, {"root.tar": tarball}, {}, scratch=scratch)
    return 0


def versions(store: Path) -> list[str]:
    directory = store / "images" / "small"
    return sorted(p.name for p in directory.iterdir() if (p / "manifest.json").is_file())


def instance_id(store: Path, name: str) -> str | None:
    try:
        return str(
            json.loads((store / "workspaces" / name / "workspace.json").read_text())["instance_id"]
        )
    except (OSError, ValueError, KeyError):
        return None


def write_pattern(store: Path, name: str, rng: random.Random) -> dict[str, Any] | None:
    """A pattern in name's disk, under the workspace's own lock, while it is stopped."""
    directory = store / "workspaces" / name
    try:
        lock = open(directory / ".lock", "a")  # noqa: SIM115
    except OSError:
        return None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        identity = instance_id(store, name)
        if identity is None or QemuRuntime(Store(store))._process(name).alive():
            return None
        offset = rng.randrange(DISK_SLOTS) * BLOCK
        pattern = rng.randrange(1, 256)
        written = subprocess.run(
            [
                "qemu-io",
                "-f",
                "qcow2",
                "-c",
                f"write -P {pattern} {offset} {BLOCK}",
                str(directory / "disk.qcow2"),
            ],
            capture_output=True,
            text=True,
        )
        if written.returncode != 0 or "error" in written.stdout.lower():
            return None
    return {"workspace": name, "instance": identity, "offset": offset, "pattern": pattern}


def pick(store: Path, rng: random.Random, *, existing: bool) -> str:
    """Mostly a name that exists (or not), sometimes any: collisions must happen too."""
    present = {n for n in NAMES if (store / "workspaces" / n).is_dir()}
    wanted = sorted(present if existing else set(NAMES) - present)
    return rng.choice(wanted) if wanted and rng.random() < 0.8 else rng.choice(NAMES)


def operate(store: Path, op: str, rng: random.Random, data: list[dict[str, Any]]) -> int:
    name = pick(store, rng, existing=op != "create")
    other = pick(store, rng, existing=False)
    if op == "create":
        known = versions(store)
        image = f"small:{rng.choice(known)}" if known and rng.random() < 0.4 else "small"
        return cli(store, "workspace", "create", name, "--image", image).returncode
    if op == "clone":
        written = write_pattern(store, name, rng)
        result = cli(store, "workspace", "clone", name, other, "--json")
        if result.returncode == 0 and written is not None:
            data.append({**written, "clone": other, "clone_instance": instance_id(store, other)})
        return result.returncode
    if op == "rm":
        force = ["--force"] if rng.random() < 0.3 else []
        return cli(store, "workspace", "rm", *force, name).returncode
    if op == "start":
        return cli(store, "workspace", "start", name).returncode
    if op == "stop":
        return cli(store, "workspace", "stop", name, "--timeout", "0").returncode
    if op == "status":
        return cli(store, "workspace", "status", name).returncode
    if op == "ls":
        return cli(store, "workspace", "ls").returncode
    if op == "image-rm":
        known = versions(store)
        return cli(store, "image", "rm", f"small:{rng.choice(known)}").returncode if known else 0
    if op == "gc":
        return cli(store, "image", "gc").returncode
    if op == "land":
        return land(store)
    if op == "cache-put":
        return cache_put(store)
    if op == "cache-prune":
        return cli(store, "cache", "prune", "--max-size", "200K").returncode
    raise AssertionError(op)


def worker(store: Path, seed: int, ops: int, log: Path) -> None:
    rng = random.Random(seed)
    data: list[dict[str, Any]] = []
    with open(log, "w") as out:
        for _ in range(ops):
            op = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
            started = time.monotonic()
            try:
                code = operate(store, op, rng, data)
            except subprocess.TimeoutExpired:
                code = -1  # a hang
            except Exception as exc:  # a landing or cache put that raised
                print(f"{op}: {type(exc).__name__}: {exc}", file=sys.stderr)
                code = 1
            out.write(json.dumps({"op": op, "code": code, "seconds": time.monotonic() - started}))
            out.write("\n")
            out.flush()
        out.write(json.dumps({"data": data}) + "\n")


# ---- the check afterwards ------------------------------------------------------------


def backing_chain(disk: Path) -> list[dict[str, Any]]:
    info = subprocess.run(
        ["qemu-img", "info", "--backing-chain", "-U", "--output=json", str(disk)],
        capture_output=True,
        text=True,
        check=True,
    )
    chain: list[dict[str, Any]] = json.loads(info.stdout)
    return chain


def reads_pattern(disk: Path, offset: int, pattern: int) -> bool:
    result = subprocess.run(
        [
            "qemu-io",
            "-r",
            "-U",
            "-f",
            "qcow2",
            "-c",
            f"read -P {pattern} {offset} {BLOCK}",
            str(disk),
        ],
        capture_output=True,
        text=True,
    )
    return result.returncode == 0 and "verification failed" not in result.stdout.lower()


def check(store: Path, data: list[dict[str, Any]]) -> dict[str, Any]:
    failures: list[str] = []
    workspaces = store / "workspaces"
    for name in NAMES:  # no VM left running; then what interrupted work left is swept
        if (workspaces / name).is_dir():
            cli(store, "workspace", "stop", name, "--timeout", "0")
    gc = cli(store, "image", "gc", "--json")
    if gc.returncode != 0:
        failures.append(f"final gc failed: {gc.stderr}")
    held: set[Path] = set()
    chains = 0
    for directory in sorted(workspaces.iterdir()) if workspaces.is_dir() else []:
        if directory.name.startswith("."):
            failures.append(f"left behind: {directory}")
            continue
        disk = directory / "disk.qcow2"
        if (directory / "disk.qcow2.new").exists():
            failures.append(f"left behind: {directory / 'disk.qcow2.new'}")
        checked = subprocess.run(["qemu-img", "check", "-U", str(disk)], capture_output=True)
        if checked.returncode != 0:
            failures.append(f"qemu-img check {disk}: {checked.stdout.decode()[-300:]}")
        try:
            chain = backing_chain(disk)
        except subprocess.CalledProcessError as exc:
            failures.append(f"backing chain of {disk} is broken: {exc.stderr[-300:]}")
            continue
        chains += 1
        files = [Path(entry["filename"]) for entry in chain[1:]]
        held.update(f.resolve() for f in files)
        if not files or not files[-1].is_relative_to(store / "images"):
            failures.append(f"{disk} is not built on an image version: {files}")
        if any(not f.is_file() for f in files):
            failures.append(f"{disk} is built on a missing file: {files}")
    layers = store / "layers"
    orphans = (
        [p for p in layers.glob("*.qcow2") if p.resolve() not in held] if layers.is_dir() else []
    )
    failures += [f"orphaned layer {p}" for p in orphans]
    checked_data = 0
    for record in data:
        for name, identity in (
            (record["workspace"], record["instance"]),
            (record["clone"], record["clone_instance"]),
        ):
            if instance_id(store, name) != identity:
                continue  # removed (and perhaps made anew) since: nothing to read back
            checked_data += 1
            if not reads_pattern(
                workspaces / name / "disk.qcow2", record["offset"], record["pattern"]
            ):
                failures.append(f"{name} lost the data written before clone: {record}")
    for version in versions(store):
        manifest = store / "images" / "small" / version / "manifest.json"
        try:
            json.loads(manifest.read_text())
        except ValueError:
            failures.append(f"damaged manifest {manifest}")
    latest = store / "images" / "small" / "latest"
    if latest.is_symlink() and not (latest.parent / os.readlink(latest) / "manifest.json").exists():
        failures.append("latest points at no version")
    staging = store / "staging"
    leftovers = (
        [p.name for p in staging.iterdir() if not p.name.endswith(".lock")]
        if staging.is_dir()
        else []
    )
    failures += [f"staging left behind: {name}" for name in leftovers]
    return {
        "workspaces_checked": chains,
        "layers": len(list(layers.glob("*.qcow2"))) if layers.is_dir() else 0,
        "data_checks": checked_data,
        "failures": failures,
    }


def run(store: Path, workers: int, ops: int, seed: int) -> dict[str, Any]:
    land_small_image(Store(store))
    logs = [store.parent / f"stress-{store.name}-{i}.jsonl" for i in range(workers)]
    per_worker = [ops // workers + (1 if i < ops % workers else 0) for i in range(workers)]
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.stress",
                "--worker",
                str(seed * 1000 + i),
                "--store",
                str(store),
                "--ops",
                str(per_worker[i]),
                "--log",
                str(logs[i]),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'src'}"},
        )
        for i in range(workers)
    ]
    for proc in procs:
        proc.wait()
    seconds = time.monotonic() - started
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    data: list[dict[str, Any]] = []
    done = 0
    for log in logs:
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if "data" in entry:
                data += entry["data"]
                continue
            done += 1
            outcomes[f"{entry['op']}:{entry['code']}"] += 1
            if entry["code"] not in ALLOWED[entry["op"]]:
                failures.append(f"{entry['op']} exited {entry['code']}")
    report = check(store, data)
    report["failures"] = failures + report["failures"]
    return {
        "workers": workers,
        "operations": done,
        "seconds": round(seconds, 1),
        "outcomes": dict(sorted(outcomes.items())),
        **report,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--ops", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--log", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.store, args.worker, args.ops, args.log)
        return 0
    args.store.mkdir(parents=True, exist_ok=True)
    report = run(args.store.resolve(), args.workers, args.ops, args.seed)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

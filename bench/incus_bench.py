"""Benchmark of Incus workspaces beside QEMU's, for the default image: create and clone
on Incus's dir and btrfs pools against the QEMU overlay and a full copy of the disk,
and start to /healthz of a system container against the QEMU VM under TCG.

    sudo .venv/bin/python -m bench.incus_bench --store STORE_WITH_THE_DEFAULT_IMAGE

It starts its own incusd (tests/e2e/incus.py: loopback only). Results go into
BENCHMARKS.md between the incus-bench markers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import write_section
from bench.workspace_bench import copy_and_sync, timed
from rockpool.runtime.base import Runtime
from rockpool.runtime.incus import IncusRuntime
from rockpool.runtime.qemu import QemuRuntime
from rockpool.store import Store
from tests.e2e.incus import Daemon, standalone


def pool_used(daemon: Daemon, pool: str) -> int:
    """btrfs: what Incus says the pool uses; dir: the bytes of its directory (Incus
    reports the whole filesystem's)."""
    if pool == "default":
        return daemon.pool_used(pool)
    directory = daemon.directory / "storage-pools" / pool
    result = subprocess.run(["du", "-s", "-B1", str(directory)], capture_output=True, text=True)
    return int(result.stdout.split()[0])


def wait_healthz(runtime: Runtime, name: str) -> None:
    endpoint = runtime.endpoint(name)
    while True:
        try:
            with urllib.request.urlopen(endpoint.url + "healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)  # poll interval of the readiness check


def start_to_healthz(runtime: Runtime, name: str) -> float:
    started = time.monotonic()
    runtime.start(name)
    wait_healthz(runtime, name)
    return time.monotonic() - started


def measure_pool(
    daemon: Daemon, incus: IncusRuntime, image: str, pool: str, results: dict[str, Any]
) -> None:
    """Two creates (the first unpacks the image into the pool) and a clone, in pool."""
    label = "btrfs" if pool == "default" else "dir"
    daemon.incus("profile", "device", "set", "default", "root", f"pool={pool}")
    first, second = f"bench-{label}-1", f"bench-{label}-2"
    results[f"{label} first create"] = timed(lambda: incus.create(first, image))
    results[f"{label} next create"] = timed(lambda: incus.create(second, image))
    before = pool_used(daemon, pool)
    results[f"{label} clone"] = timed(lambda: incus.clone(first, f"{first}-c"))
    results[f"{label} clone bytes"] = pool_used(daemon, pool) - before


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, required=True, help="a store with the image")
    parser.add_argument("--image", default="workspace")
    args = parser.parse_args()
    store = Store(args.store)
    version = store.resolve(args.image)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rockpool-incus-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        results["full copy of disk.qcow2"] = timed(
            lambda: copy_and_sync(version.output_path("qcow2"), work / "copy.qcow2")
        )
        qemu = QemuRuntime(store)
        results["qemu create"] = timed(lambda: qemu.create("bench-q", version.ref))
        results["qemu clone"] = timed(lambda: qemu.clone("bench-q", "bench-q2"))
        with standalone() as daemon:
            os.environ["INCUS_DIR"] = str(daemon.directory)
            incus = IncusRuntime(store)
            results["incus install"] = timed(lambda: incus.install_image(version))
            measure_pool(daemon, incus, version.ref, "default", results)
            starts = []
            for _ in range(2):
                starts.append(start_to_healthz(incus, "bench-btrfs-2"))
                incus.stop("bench-btrfs-2")
            results["container start to /healthz"] = starts
            # The profile's root pool changes only while no instance uses it.
            for workspace in incus.list():
                incus.remove(workspace.name, force=True)
            measure_pool(daemon, incus, version.ref, "plain", results)
            for workspace in incus.list():
                incus.remove(workspace.name, force=True)
        vm = start_to_healthz(qemu, "bench-q")
        results["qemu start to /healthz"] = vm
        for name in ("bench-q2", "bench-q"):
            qemu.remove(name, force=True)
    body = report(results, version.manifest["disk"]["root_used_bytes"])
    print(body)
    write_section("incus-bench", "Incus (`sudo .venv/bin/python -m bench.incus_bench`)", body)
    return 0


def report(r: dict[str, Any], root_bytes: int) -> str:
    copy = r["full copy of disk.qcow2"]
    mib: Callable[[int], str] = lambda b: f"{b / (1 << 20):.0f} MiB"  # noqa: E731
    rows = [
        ("full copy of disk.qcow2 (the baseline)", f"{copy:.2f} s", "1"),
        (
            "QEMU create (qcow2 overlay)",
            f"{r['qemu create']:.3f} s",
            f"{r['qemu create'] / copy:.3f}",
        ),
        ("QEMU clone", f"{r['qemu clone']:.3f} s", f"{r['qemu clone'] / copy:.3f}"),
        (
            "Incus image install (import both forms)",
            f"{r['incus install']:.1f} s",
            f"{r['incus install'] / copy:.2f}",
        ),
    ]
    for label in ("btrfs", "dir"):
        for what in ("first create", "next create", "clone"):
            seconds = r[f"{label} {what}"]
            rows.append((f"Incus {label}: {what}", f"{seconds:.2f} s", f"{seconds / copy:.2f}"))
        rows.append(
            (
                f"Incus {label}: clone's new space in the pool",
                mib(r[f"{label} clone bytes"]),
                f"root: {mib(root_bytes)}",
            )
        )
    starts = r["container start to /healthz"]
    vm = r["qemu start to /healthz"]
    rows.append(
        (
            "container start to /healthz",
            ", ".join(f"{s:.1f} s" for s in starts),
            f"{min(starts) / vm:.3f} of the VM's",
        )
    )
    rows.append(("QEMU VM (TCG) start to /healthz", f"{vm:.1f} s", "1"))
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return (
        f"Measured {time.strftime('%Y-%m-%d')} on the machine noted above (2 cores), for the "
        "default image. The ratio column is to the full copy (create and clone) or to the "
        'QEMU VM (start), both measured in the same run. "first create" unpacks the image '
        "into the pool; later creates start from that.\n\n"
        "| measure | result | ratio |\n| --- | --- | --- |\n" + table
    )


if __name__ == "__main__":
    raise SystemExit(main())

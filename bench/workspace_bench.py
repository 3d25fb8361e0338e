"""Benchmark of workspace operations on QEMU: create and clone against a full copy of
the disk, for 1, 5 and 20 GB images, and start-to-/healthz of the real image.

    sudo .venv/bin/python -m bench.workspace_bench --store STORE_WITH_THE_IMAGE

The size series uses synthetic images (a qcow2 of that size, filled with data by
qemu-io) landed in a scratch store: create and clone must not depend on their size.
Results go into BENCHMARKS.md between the workspace-bench markers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bench.report import write_section
from rockpool.arch import host_architecture
from rockpool.runtime.base import State
from rockpool.runtime.qemu import QemuRuntime
from rockpool.store import Store

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def synthetic_version(store: Store, size_gib: int, work: Path) -> str:
    prepared = work / f"prepared-{size_gib}"
    prepared.mkdir()
    disk = prepared / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(disk), f"{size_gib}G"], check=True
    )
    # One request per GiB: qemu-io refuses single requests of several GiB.
    writes = [arg for gib in range(size_gib) for arg in ("-c", f"write -P 0xab {gib}G 1G")]
    subprocess.run(["qemu-io", "-f", "qcow2", *writes, str(disk)], check=True, capture_output=True)
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00"),
        "architecture": host_architecture(),
        "spec": {"cpus": 1, "memory": GIB},
        "outputs": {"qcow2": {"file": "disk.qcow2", "size": disk.stat().st_size}},
    }
    name = f"synthetic-{size_gib}g"
    store.land(name, f"{size_gib:012x}", prepared, manifest)
    return name


def copy_and_sync(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    os.sync()


def measure_size(size: int) -> tuple[int, float, float, float]:
    with tempfile.TemporaryDirectory(prefix="rockpool-wsbench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        store = Store(work / "store")
        runtime = QemuRuntime(store)
        image = synthetic_version(store, size, work)
        disk = store.resolve(image).output_path("qcow2")
        # A copy is done when it is on disk; syncing also keeps its writeback out of
        # the create and clone timings that follow.
        copy = timed(lambda: copy_and_sync(disk, work / "full-copy.qcow2"))
        create = timed(lambda: runtime.create("bench", image))
        clone = timed(lambda: runtime.clone("bench", "bench-clone"))
        return size, copy, create, clone


def start_to_healthz(store_dir: Path, boots: int, network: str) -> list[float]:
    """Seconds from start to /healthz 200, with ROCKPOOL_NETWORK=network."""
    runtime = QemuRuntime(Store(store_dir))
    results = []
    os.environ["ROCKPOOL_NETWORK"] = network
    for index in range(boots):
        name = f"bench-boot-{network}-{index}"
        runtime.create(name, "workspace")
        try:
            started = time.monotonic()
            workspace = runtime.start(name)
            assert workspace.endpoint is not None
            url = workspace.endpoint.url + "healthz"
            while True:
                assert runtime.status(name).state == State.RUNNING, "the VM stopped"
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                time.sleep(0.5)  # poll interval of the readiness check
            results.append(time.monotonic() - started)
        finally:
            runtime.remove(name, force=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, required=True, help="a store with the image")
    parser.add_argument("--boots", type=int, default=2)
    parser.add_argument("--sizes", default="1,5,20")
    args = parser.parse_args()
    rows = [measure_size(int(s)) for s in args.sizes.split(",")]
    # Isolated and open boots in turn, so both meet the same load: the ratio is the cost
    # of the isolation (-runas and the nftables table) on this machine, in this run.
    boots: dict[str, list[float]] = {"isolated": [], "open": []}
    for _ in range(args.boots):
        for network in boots:
            boots[network] += start_to_healthz(args.store, 1, network)
    mean = {network: sum(times) / len(times) for network, times in boots.items()}
    table = "\n".join(
        f"| {size} GB | {copy:.2f} s | {create:.3f} s | {clone:.3f} s |"
        for size, copy, create, clone in rows
    )
    body = (
        f"Measured {time.strftime('%Y-%m-%d')} on the machine noted above.\n\n"
        "| image size | full copy of the disk | create | clone |\n| --- | --- | --- | --- |\n"
        f"{table}\n\nTarget: create and clone < 0.2 s and flat in image size.\n\n"
        "start to /healthz 200 (real default image, fresh workspace), isolated "
        "(the default): "
        + ", ".join(f"{b:.1f} s" for b in boots["isolated"])
        + "; open (`ROCKPOOL_NETWORK=open`, the baseline): "
        + ", ".join(f"{b:.1f} s" for b in boots["open"])
        + f"; ratio of the means {mean['isolated'] / mean['open']:.2f}"
    )
    print(body)
    write_section(
        "workspace-bench", "Workspaces (`sudo .venv/bin/python -m bench.workspace_bench`)", body
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

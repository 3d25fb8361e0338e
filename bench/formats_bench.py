"""Benchmark of the formats stage's costly part, the qcow2 and the raw disk's digest:
today's recipe beside the recipe before it (rockpool 1a87fef: zlib on one core, the
whole 20 GiB raw read for its sha256), both run on the same raw disk in one run.

    sudo .venv/bin/python -m bench.formats_bench [--store DIR] [--rounds N]

It builds the default image into the store (or reuses it there) and reports that
build's whole formats stage beside its other stages. Writes the formats-bench section
of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.image_bench import machine_note, rockpool_build
from bench.report import write_section
from rockpool.files import sha256_chunks, sha256_file
from rockpool.store import Store
from rockpool.tools.qemu_img import QCOW2_CLUSTER_SIZE, convert_to_qcow2

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "images" / "workspace.toml"


def before(raw: Path, qcow2: Path) -> None:
    """The stage before 1a87fef's successor: the whole raw hashed while qemu-img
    compresses with zlib, then the qcow2 hashed."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        digest = pool.submit(sha256_file, raw)
        subprocess.run(
            ["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"cluster_size={QCOW2_CLUSTER_SIZE}", str(raw), str(qcow2)],
            check=True,
        )  # fmt: skip
        digest.result()
    sha256_file(qcow2)


def now(raw: Path, qcow2: Path) -> None:
    """Today's: the raw's allocated chunks hashed on every core while qemu-img compresses
    with zstd, then the qcow2 hashed."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        digest = pool.submit(sha256_chunks, raw)
        convert_to_qcow2(raw, qcow2)
        digest.result()
    sha256_file(qcow2)


def timed(recipe: Callable[[Path, Path], None], raw: Path, qcow2: Path) -> tuple[float, int]:
    qcow2.unlink(missing_ok=True)
    started = time.monotonic()
    recipe(raw, qcow2)
    return time.monotonic() - started, qcow2.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, help="a store to build into (or reuse)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="rockpool-formats-bench-"))
    store_dir = args.store or scratch / "store"
    _, built = rockpool_build(store_dir, "--no-verify", spec=SPEC)
    version = Store(store_dir).version(str(built["name"]), str(built["version"]))
    raw = version.output_path("raw")
    results: dict[str, list[tuple[float, int]]] = {"before": [], "now": []}
    for _ in range(args.rounds):  # in turn, so that both meet the same load
        results["before"].append(timed(before, raw, scratch / "before.qcow2"))
        results["now"].append(timed(now, raw, scratch / "now.qcow2"))
    stages = version.manifest["stage_seconds"]
    report: dict[str, Any] = {
        "machine": machine_note(),
        "date": time.strftime("%Y-%m-%d"),
        "image": version.ref,
        "raw_allocated": version.manifest["outputs"]["raw"]["allocated"],
        "stages": stages,
        **results,
    }
    print(json.dumps(report, indent=2))
    where = f"{report['date']} on {report['machine']}; image {version.ref}"
    write_markdown(where, report["raw_allocated"], results["before"], results["now"], stages)
    return 0


def write_markdown(
    where: str,
    raw_allocated: int,
    before: list[tuple[float, int]],
    now: list[tuple[float, int]],
    stages: dict[str, float],
) -> None:
    mib = 1 << 20
    base = statistics.fmean(t for t, _ in before)
    ours = statistics.fmean(t for t, _ in now)
    total = sum(stages.values())
    rows = [
        (
            "before: zlib on one core, whole raw sha256 (the baseline)",
            ", ".join(f"{t:.1f} s" for t, _ in before),
            f"{before[0][1] / mib:.0f} MiB",
            "1",
        ),
        (
            "now: zstd, raw digested by allocated 4 MiB chunks on every core",
            ", ".join(f"{t:.1f} s" for t, _ in now),
            f"{now[0][1] / mib:.0f} MiB",
            f"{ours / base:.2f}",
        ),
    ]
    table = "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)
    body = (
        f"Measured {where}, raw disk {raw_allocated / mib:.0f} MiB allocated of 20 GiB "
        "(target: at most 0.25 of before).\n\n"
        "| qcow2 and raw digest | runs | qcow2 | ratio |\n| --- | --- | --- | --- |\n"
        f"{table}\n\n"
        f"The whole formats stage of that build (qcow2, raw, Incus VM and container, at "
        f"once): {stages.get('formats', 0):.0f} s of {total:.0f} s "
        f"({100 * stages.get('formats', 0) / total:.0f}% of the build); "
        + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())
        + "."
    )
    write_section("formats-bench", "Formats (`sudo .venv/bin/python -m bench.formats_bench`)", body)


if __name__ == "__main__":
    raise SystemExit(main())

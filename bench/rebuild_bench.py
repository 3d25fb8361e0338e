"""Benchmark of reproducible and incremental builds of the default image.

    sudo .venv/bin/python -m bench.rebuild_bench [--spec images/workspace.toml]

In two fresh stores: a cold build (from the spec's lock when it has one), a no-op
rebuild, a rebuild after a one-line setup.sh change, and a second cold build in the
other store, whose outputs are compared with the first. Writes the rebuild-bench
section of BENCHMARKS.md and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.image_bench import machine_note, rockpool_build
from bench.report import write_section

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "images" / "workspace.toml"


def tuned_variant(spec: Path, directory: Path) -> Path:
    """spec with a setup.sh that does one more thing: what a user tuning it does."""
    script = directory / "setup.sh"
    original = (REPO / "images" / "scripts" / "setup.sh").read_text()
    script.write_text(original + "\necho tuned > /etc/rockpool-bench-tuned\n")
    variant = directory / "tuned.toml"
    variant.write_text(f'extends = "{spec}"\n[provision]\nscript = "{script}"\n')
    lock = spec.with_name(spec.name.removesuffix(".toml") + ".lock.json")
    if lock.is_file():  # the same inputs, so the same lock: a lock is per spec file
        shutil.copyfile(lock, directory / "tuned.lock.json")
    return variant


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, default=SPEC)
    args = parser.parse_args()
    spec = args.spec.resolve()
    scratch = Path(tempfile.mkdtemp(prefix="rockpool-rebuild-bench-"))
    first, second = scratch / "store-1", scratch / "store-2"
    results: dict[str, Any] = {"machine": machine_note(), "date": time.strftime("%Y-%m-%d")}
    locked = spec.with_name(spec.name.removesuffix(".toml") + ".lock.json").is_file()
    results["locked"] = locked

    results["cold_s"], cold = rockpool_build(first, spec=spec)
    results["cold_stages"] = cold["manifest"]["stage_seconds"]
    results["noop_s"], noop = rockpool_build(first, spec=spec)
    assert noop["reused"], "an unchanged rebuild was not a no-op"
    results["tuned_s"], tuned = rockpool_build(first, spec=tuned_variant(spec, scratch))
    results["tuned_stages"] = tuned["stages"]
    results["tuned_stage_seconds"] = tuned["manifest"]["stage_seconds"]
    results["second_cold_s"], again = rockpool_build(second, spec=spec)
    results["identical"] = {
        name: output["sha256"] == again["manifest"]["outputs"][name]["sha256"]
        for name, output in cold["manifest"]["outputs"].items()
    }
    results["versions"] = [cold["version"], again["version"]]
    print(json.dumps(results, indent=2))
    write_markdown(results)
    return 0


def write_markdown(r: dict[str, Any]) -> None:
    cold = r["cold_s"]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in r["cold_stages"].items())
    tuned_ran = ", ".join(
        f"{k} {r['tuned_stage_seconds'].get(k, 0):.0f} s ({what})"
        for k, what in r["tuned_stages"].items()
        if not k.startswith("formats/")
    )
    same = all(r["identical"].values())
    rows = [
        ("cold build" + (" (from the lock)" if r["locked"] else ""), f"{cold:.0f} s", ""),
        ("  stages", stages, ""),
        ("no-op rebuild", f"{r['noop_s']:.1f} s", "<= 5 s"),
        (
            "rebuild after a setup.sh change",
            f"{r['tuned_s']:.0f} s = {100 * r['tuned_s'] / cold:.0f}% of the cold build",
            "<= 20%",
        ),
        ("  stages", tuned_ran, ""),
        ("second cold build, another store", f"{r['second_cold_s']:.0f} s", ""),
        (
            "two cold builds identical",
            ("yes: " if same else "NO: ")
            + ", ".join(f"{k} {'same' if v else 'differs'}" for k, v in r["identical"].items())
            + f" (version {r['versions'][0]}"
            + ("" if same else f" vs {r['versions'][1]}")
            + ")",
            "identical",
        ),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    body = (
        f"Measured {r['date']} on {r['machine']}.\n\n"
        f"| measure | result | target |\n| --- | --- | --- |\n{table}"
    )
    write_section(
        "rebuild-bench",
        "Reproducible and incremental builds (`sudo .venv/bin/python -m bench.rebuild_bench`)",
        body,
    )


if __name__ == "__main__":
    raise SystemExit(main())

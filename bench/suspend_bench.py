"""Benchmark of suspend and resume: a workspace of the default image resumed to /healthz
beside its own cold boot to /healthz, in the same run; the suspend's time and its state's
size beside the guest's memory.

    sudo .venv/bin/python -m bench.suspend_bench [--store DIR] [--rounds N]

Each round creates a workspace, boots it cold to /healthz, suspends it and resumes it to
/healthz, through the QEMU runtime as the worker drives it. Writes the suspend-bench
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.image_bench import machine_note, rockpool_build
from bench.report import write_section
from rockpool.errors import NotFound
from rockpool.runtime import suspend
from rockpool.runtime.qemu import QemuRuntime
from rockpool.store import Store

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "images" / "workspace.toml"
DEADLINE = 900.0


def healthz_after(runtime: QemuRuntime, name: str, started: float) -> float:
    """Seconds from started until the workspace's /healthz answers 200."""
    endpoint = runtime.endpoint(name)
    deadline = started + DEADLINE
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=5)
        with contextlib.suppress(OSError, http.client.HTTPException):
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return time.monotonic() - started
        connection.close()
        time.sleep(0.1)  # poll interval between readiness checks
    raise RuntimeError(f"{name}: no /healthz within {DEADLINE:.0f}s")


def one_round(runtime: QemuRuntime, image: str, name: str) -> dict[str, float]:
    env = {"ROCKPOOL_TEAM": "bench"}
    runtime.create(name, image)
    try:
        started = time.monotonic()
        runtime.start(name, env)
        cold = healthz_after(runtime, name, started)
        began = time.monotonic()
        runtime.stop(name, suspend=True)
        suspended = time.monotonic() - began
        state = suspend.directory(runtime.root / name) / suspend.STATE
        size = state.stat().st_size
        started = time.monotonic()
        workspace = runtime.start(name, env)
        last_start = workspace.details["last_start"]
        assert last_start["resumed"] and last_start["clock"]["set"], last_start
        resumed = healthz_after(runtime, name, started)
        return {
            "cold_s": cold,
            "suspend_s": suspended,
            "state_mib": size / 2**20,
            "resume_s": resumed,
            "clock_behind_s": -last_start["clock"]["was_off_seconds"],
        }
    finally:
        with contextlib.suppress(NotFound):
            runtime.remove(name, force=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, help="a store to build into (or reuse)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    store_dir = args.store or Path(tempfile.mkdtemp(prefix="rockpool-suspend-bench-")) / "store"
    _, built = rockpool_build(store_dir, spec=SPEC)
    version = Store(store_dir).version(str(built["name"]), str(built["version"]))
    runtime = QemuRuntime(Store(store_dir))
    rounds = [one_round(runtime, version.ref, f"nap{n}") for n in range(args.rounds)]
    memory_mib = version.manifest.get("spec", {}).get("memory", 4 << 30) / 2**20
    machine, date = machine_note(), time.strftime("%Y-%m-%d")
    print(json.dumps({"machine": machine, "image": version.ref, "rounds": rounds}, indent=2))

    def runs(key: str, unit: str = "s") -> str:
        return ", ".join(f"{r[key]:.1f}" for r in rounds) + f" {unit}"

    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in rounds)

    ratio = mean("resume_s") / mean("cold_s")
    body = (
        f"Measured {date} on {machine}; image {version.ref}, {memory_mib:.0f} MiB of guest "
        f"memory; {len(rounds)} rounds, each a new workspace.\n\n"
        "| measure | runs | ratio |\n| --- | --- | --- |\n"
        f"| cold boot: start to /healthz (the baseline) | {runs('cold_s')} | 1 |\n"
        f"| **resume: start to /healthz** | {runs('resume_s')} | {ratio:.3f} |\n"
        f"| suspend (`stop --suspend`) | {runs('suspend_s')} | "
        f"{mean('suspend_s') / mean('cold_s'):.3f} |\n"
        f"| saved state | {runs('state_mib', 'MiB')} | "
        f"{mean('state_mib') / memory_mib:.2f} of the guest's memory |\n"
        f"| the guest's clock behind the host's at the resume, then set | "
        f"{runs('clock_behind_s')} | (part of the resume) |\n\n"
        f"Resume to /healthz is {ratio:.1%} of a cold boot's (target: at most 10%)."
    )
    write_section(
        "suspend-bench", "Suspend and resume (`sudo .venv/bin/python -m bench.suspend_bench`)", body
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

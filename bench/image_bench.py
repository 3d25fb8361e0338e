"""Benchmark of the default image: cold build, no-op rebuild, size, boot, idle memory.

    sudo .venv/bin/python -m bench.image_bench [--store DIR] [--boots N]

Writes its results into BENCHMARKS.md (the section between the image-bench markers)
and prints them. With --store pointing at a store that already holds the image, the
cold build is skipped and the recorded build time of that version is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import write_section
from rockpool.arch import host_architecture
from rockpool.store import Store, Version
from rockpool.tools import kvm
from tests.e2e.guest import Guest

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "images" / "workspace.toml"
IDLE_SETTLE_SECONDS = 60


def rockpool_build(store: Path, *extra: str, spec: Path = SPEC) -> tuple[float, dict[str, Any]]:
    env = {**os.environ, "ROCKPOOL_HOME": str(store)}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "rockpool", "-q", "image", "build", str(spec), "--json", *extra],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return time.monotonic() - started, json.loads(result.stdout)


def number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    if match is None:
        raise ValueError(f"{pattern!r} not found")
    return int(match.group(1))


@dataclass
class Boot:
    healthz_s: float
    guest_used_mib: float
    qemu_rss_mib: float
    root_used_bytes: int
    systemd_analyze: str


def machine_note() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = number(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    verdict = kvm.choose(host_architecture())
    accel = "KVM" if verdict.kvm else f"TCG ({verdict.reason})"
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory // 1024 // 1024} GiB RAM, "
        f"{platform.platform()}, guests under {accel}"
    )


def boot_once(
    version: Version, key: Path, run_dir: Path, base: tuple[Path, str] | None = None
) -> Boot:
    guest = Guest(version, run_dir, key, base=base)
    guest.configure({"ROCKPOOL_WORKSPACE_NAME": "bench"})
    try:
        guest.start()
        healthz = guest.wait_healthz()
        guest.wait_ssh()
        time.sleep(IDLE_SETTLE_SECONDS)  # benchmark: let boot-time jobs finish before "idle"
        meminfo = guest.ssh("cat /proc/meminfo")
        used_kib = number(r"MemTotal:\s+(\d+)", meminfo) - number(r"MemAvailable:\s+(\d+)", meminfo)
        status = Path(f"/proc/{guest.running.pid}/status")
        return Boot(
            healthz_s=healthz,
            guest_used_mib=used_kib / 1024,
            qemu_rss_mib=number(r"VmRSS:\s+(\d+)", status.read_text()) / 1024,
            root_used_bytes=int(guest.ssh("df --output=used -B1 / | tail -1")),
            systemd_analyze=guest.ssh("systemd-analyze || true").strip().splitlines()[0],
        )
    finally:
        guest.kill()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, help="reuse this store's image (no cold build)")
    parser.add_argument("--boots", type=int, default=2)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="rockpool-bench-"))
    store_dir = args.store or scratch / "store"
    results: dict[str, Any] = {
        "machine": machine_note(),
        "date": time.strftime("%Y-%m-%d"),
        "store": str(store_dir),
    }

    if args.store is None:
        results["cold_build_s"], built = rockpool_build(store_dir)
        results["cold_build_measured"] = True
    else:
        _, built = rockpool_build(store_dir)
        results["cold_build_measured"] = False
    version = Store(store_dir).version(str(built["name"]), str(built["version"]))
    manifest = version.manifest
    results["recorded_build_s"] = manifest["build_seconds"]
    results["stages"] = manifest["stage_seconds"]
    results["noop_rebuild_s"], again = rockpool_build(store_dir)
    assert again["reused"], "an unchanged rebuild was not a no-op"
    results["fs_used_bytes"] = manifest["disk"]["root_used_bytes"]
    results["raw_allocated_bytes"] = manifest["outputs"]["raw"]["allocated"]
    results["qcow2_bytes"] = manifest["outputs"]["qcow2"]["size"]

    key = scratch / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    boots = [boot_once(version, key, scratch / f"boot{i}") for i in range(args.boots)]
    results["boots"] = boots
    print(json.dumps({**results, "boots": [vars(b) for b in boots]}, indent=2))
    write_markdown(results)
    return 0


def write_markdown(r: dict[str, Any]) -> None:
    boots: list[Boot] = r["boots"]
    stages: dict[str, float] = r["stages"]
    gib = 1 << 30
    cold = (
        f"{r['cold_build_s']:.0f} s"
        if r["cold_build_measured"]
        else f"{r['recorded_build_s']:.0f} s (recorded by that build)"
    )
    rows = [
        ("cold build", cold, "<= 6 min"),
        ("  stages", ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()), ""),
        (
            "  cold build / its bootstrap alone (the baseline, the same build)",
            f"{r['recorded_build_s'] / stages['bootstrap']:.1f}" if stages.get("bootstrap") else "",
            "",
        ),
        ("no-op rebuild (unchanged inputs)", f"{r['noop_rebuild_s']:.1f} s", "<= 5 s"),
        (
            "root filesystem used (ext4, incl. metadata)",
            f"{r['fs_used_bytes'] / gib:.2f} GiB",
            "<= 2.2 GB",
        ),
        (
            "root used as df sees it in the guest",
            f"{boots[0].root_used_bytes / gib:.2f} GiB",
            "",
        ),
        ("raw disk allocated", f"{r['raw_allocated_bytes'] / gib:.2f} GiB (20 GiB sparse)", ""),
        ("qcow2", f"{r['qcow2_bytes'] / (1 << 20):.0f} MiB", "<= 800 MB"),
        ("boot to /healthz 200", ", ".join(f"{b.healthz_s:.1f} s" for b in boots), "<= 40 s"),
        (
            "guest memory used at idle (MemTotal - MemAvailable)",
            ", ".join(f"{b.guest_used_mib:.0f} MiB" for b in boots),
            "<= 350 MB",
        ),
        (
            "QEMU RSS at idle (2 GiB guest)",
            ", ".join(f"{b.qemu_rss_mib:.0f} MiB" for b in boots),
            "",
        ),
        ("systemd-analyze", boots[0].systemd_analyze, ""),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    body = (
        f"Measured {r['date']} on {r['machine']}.\n\n"
        f"| measure | result | target |\n| --- | --- | --- |\n{table}"
    )
    write_section(
        "image-bench", "Default image (`sudo .venv/bin/python -m bench.image_bench`)", body
    )


if __name__ == "__main__":
    raise SystemExit(main())

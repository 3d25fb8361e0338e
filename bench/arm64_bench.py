"""Benchmark of the arm64 image for Apple Silicon: the cross-build, Tart's formats, a boot.

    sudo .venv/bin/python -m bench.arm64_bench [--store DIR --ref NAME:VERSION]

Without --store it cold-builds images/workspace-arm64.toml (on x86_64 every arm64
program but the compiler runs under qemu-user), then, as its baseline in the same run,
images/workspace.toml for amd64 in another fresh store. With --store and --ref it reports
the build recorded in that version's manifest, and no baseline. Either way it times the
tart-oci writer on the version's disk and boots the disk in qemu-system-aarch64 (AAVMF,
fresh NVRAM).
Writes its results into BENCHMARKS.md between the arm64-bench markers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.image_bench import boot_once, machine_note, number, rockpool_build
from bench.report import write_section
from rockpool.build.context import identity_seed
from rockpool.formats import FormatJob, output_format
from rockpool.progress import Reporter
from rockpool.spec import load_spec
from rockpool.store import Store, Version
from tests.e2e.guest import Guest

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "images" / "workspace-arm64.toml"
AMD64_SPEC = REPO / "images" / "workspace.toml"


def version_disk(version: Version) -> Path:
    outputs = version.manifest["outputs"]
    if "tart" in outputs:
        return version.output_path("tart") / "disk.img"
    return version.output_path("raw")


def time_tart_oci(version: Version, scratch: Path) -> dict[str, Any]:
    """The tart-oci writer alone, on the version's disk."""
    out = scratch / "tart-oci-bench"
    out.mkdir()
    spec = load_spec(SPEC)
    job = FormatJob(
        image=spec.name,
        description=spec.description,
        suite=spec.suite,
        architecture=spec.architecture,
        cpus=spec.cpus,
        memory=spec.memory,
        identity_seed=identity_seed(spec),
        source_date_epoch=int(version.manifest["source_date_epoch"]),
        reporter=Reporter(interactive=False, quiet=True),
        raw_disk=version_disk(version),
        out_dir=out,
        work=scratch,
    )
    started = time.monotonic()
    layout = output_format("tart-oci").write(job).path
    seconds = time.monotonic() - started
    blobs = list((layout / "blobs" / "sha256").iterdir())
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
    return {
        "seconds": seconds,
        "bytes": sum(b.stat().st_size for b in blobs),
        "disk_layers": len(manifest["layers"]) - 1,
        "unique_blobs": len(blobs),
    }


def boot_to_ssh(
    version: Version, key: Path, run_dir: Path, base: tuple[Path, str]
) -> dict[str, Any]:
    guest = Guest(version, run_dir, key, base=base)
    guest.configure({"ROCKPOOL_WORKSPACE_NAME": "bench"})
    try:
        started = time.monotonic()
        guest.start()
        guest.wait_ssh()
        ssh_s = time.monotonic() - started
        meminfo = guest.ssh("cat /proc/meminfo")
        used_kib = number(r"MemTotal:\s+(\d+)", meminfo) - number(r"MemAvailable:\s+(\d+)", meminfo)
        return {
            "ssh_s": ssh_s,
            "guest_used_mib": used_kib / 1024,
            "systemd_analyze": guest.ssh("systemd-analyze || true").strip().splitlines()[0],
        }
    finally:
        guest.kill()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, help="a store holding the arm64 version")
    parser.add_argument("--ref", help="NAME:VERSION in --store (default: a cold build)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="rockpool-arm64-bench-"))
    results: dict[str, Any] = {"machine": machine_note(), "date": time.strftime("%Y-%m-%d")}
    if args.store and args.ref:
        version = Store(args.store).resolve(args.ref)
        results["cold_build_measured"] = False
    else:
        store_dir = scratch / "store"
        results["cold_build_s"], built = rockpool_build(store_dir, "--no-lock", spec=SPEC)
        version = Store(store_dir).version(str(built["name"]), str(built["version"]))
        results["cold_build_measured"] = True
        # The baseline: the amd64 image, cold, from the same kind of inputs (no lock).
        results["amd64_cold_build_s"], _ = rockpool_build(
            scratch / "store-amd64", "--no-lock", spec=AMD64_SPEC
        )
    manifest = version.manifest
    results["spec"] = manifest["spec"]["path"]
    results["recorded_build_s"] = manifest["build_seconds"]
    results["stages"] = manifest["stage_seconds"]
    results["fs_used_bytes"] = manifest["disk"]["root_used_bytes"]
    results["tart_oci"] = time_tart_oci(version, scratch)
    key = scratch / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    base = (version_disk(version), "raw")
    if "code-server" in manifest["packages"]["npm"]:
        results["boot"] = vars(boot_once(version, key, scratch / "boot", base=base))
    else:  # the CI test image: no code-server, so SSH is what answers first
        results["boot"] = boot_to_ssh(version, key, scratch / "boot", base)
    print(json.dumps(results, indent=2))
    write_markdown(results)
    return 0


def write_markdown(r: dict[str, Any]) -> None:
    gib, mib = 1 << 30, 1 << 20
    oci = r["tart_oci"]
    boot = r["boot"]
    build = (
        f"{r['cold_build_s']:.0f} s"
        if r["cold_build_measured"]
        else f"{r['recorded_build_s']:.0f} s (recorded by that build)"
    )
    baseline = r.get("amd64_cold_build_s")
    versus = (
        f" = {r['cold_build_s'] / baseline:.1f} times the amd64 cold build "
        f"({baseline:.0f} s, the same run; target: at most 5)"
        if baseline
        else ""
    )
    rows = [
        ("spec", f"`{Path(r['spec']).name}`"),
        ("cold cross-build (qemu-user, native cross gcc)", build + versus),
        ("  stages", ", ".join(f"{k} {v:.0f} s" for k, v in r["stages"].items())),
        ("root filesystem used", f"{r['fs_used_bytes'] / gib:.2f} GiB"),
        (
            "tart-oci writer (512 MiB chunks, Apple LZ4)",
            f"{oci['seconds']:.1f} s, {oci['bytes'] / mib:.0f} MiB in {oci['disk_layers']} "
            f"disk layers ({oci['unique_blobs']} distinct blobs)",
        ),
        (
            "boot to /healthz 200 (qemu-system-aarch64, TCG)"
            if "healthz_s" in boot
            else "boot to SSH (qemu-system-aarch64, TCG; this image has no code-server)",
            f"{boot.get('healthz_s', boot.get('ssh_s', 0)):.1f} s",
        ),
        ("guest memory used after boot", f"{boot['guest_used_mib']:.0f} MiB"),
        ("systemd-analyze", boot["systemd_analyze"]),
    ]
    table = "\n".join(f"| {a} | {b} |" for a, b in rows)
    body = (
        f"Measured {r['date']} on {r['machine']}.\n\n| measure | result |\n| --- | --- |\n{table}"
    )
    write_section(
        "arm64-bench", "arm64 image for Tart (`sudo .venv/bin/python -m bench.arm64_bench`)", body
    )


if __name__ == "__main__":
    raise SystemExit(main())

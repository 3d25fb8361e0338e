"""Benchmark of first boot: the default image's boot to /healthz beside the boot to
multi-user.target of a minimal image (tests/specs/small.toml: the same tool, kernel and
setup.sh, no code-server), both built into one store and booted in turn in one run.

    sudo .venv/bin/python -m bench.boot_bench [--store DIR] [--boots N]

Each figure counts from QEMU's start on the host. A guest event (multi-user.target
reached, code-server's process started, code-server listening) is placed on the host's
clock from the guest's monotonic clock, read with /proc/uptime in the same SSH call, so
the polling interval adds nothing to it. Writes the boot-bench section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.image_bench import machine_note, rockpool_build
from bench.report import write_section
from rockpool.store import Store, Version
from tests.e2e.guest import Guest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPEC = REPO / "images" / "workspace.toml"
MINIMAL_SPEC = REPO / "tests" / "specs" / "small.toml"
USEC = 1e6

# Monotonic microseconds since the guest's kernel started, and uptime at the same moment.
GUEST_CLOCKS = (
    "cat /proc/uptime; "
    "systemctl show -p ActiveEnterTimestampMonotonic --value multi-user.target; "
    "systemctl show -p ExecMainStartTimestampMonotonic --value code-server.service "
    "2>/dev/null || echo 0; "
    "sudo journalctl -b -u code-server -o json --output-fields=MESSAGE 2>/dev/null "
    "| grep -m1 'HTTP server listening' || echo '{}'"
)


@dataclass
class Boot:
    image: str
    ready_s: float  # /healthz (default image) or SSH (minimal image), host clock
    kernel_start_s: float  # QEMU start to the guest kernel's start (firmware, loader)
    multi_user_s: float
    code_server_started_s: float | None
    code_server_listening_s: float | None
    blame: list[str]


def guest_events(guest: Guest) -> dict[str, float | None]:
    """Guest events in seconds since QEMU started, on the host's clock."""
    asked = time.monotonic()
    lines = guest.ssh(GUEST_CLOCKS).splitlines()
    answered = time.monotonic()
    # The call's midpoint stands for the moment the guest read its clocks.
    now = (asked + answered) / 2 - guest.running.started_at
    uptime = float(lines[0].split()[0])
    kernel_start = now - uptime

    def at(monotonic_usec: int) -> float | None:
        return kernel_start + monotonic_usec / USEC if monotonic_usec > 0 else None

    listening = json.loads(lines[3])
    return {
        "kernel_start": kernel_start,
        "multi_user": at(int(lines[1] or 0)),
        "code_server_started": at(int(lines[2] or 0)),
        "code_server_listening": at(int(listening.get("__MONOTONIC_TIMESTAMP", 0))),
    }


def boot_once(version: Version, key: Path, run_dir: Path, healthz: bool) -> Boot:
    guest = Guest(version, run_dir, key)
    guest.configure({"ROCKPOOL_WORKSPACE_NAME": "bench"})
    try:
        guest.start()
        if healthz:
            ready = guest.wait_healthz()
            guest.wait_ssh()
        else:
            guest.wait_ssh()
            ready = time.monotonic() - guest.running.started_at
        guest.ssh("systemctl is-system-running --wait >/dev/null || true", timeout=300)
        events = guest_events(guest)
        multi_user = events["multi_user"]
        assert multi_user is not None, "multi-user.target was not reached"
        return Boot(
            image=version.ref,
            ready_s=ready,
            kernel_start_s=events["kernel_start"] or 0.0,
            multi_user_s=multi_user,
            code_server_started_s=events["code_server_started"],
            code_server_listening_s=events["code_server_listening"],
            blame=guest.ssh("systemd-analyze blame | head -8").split("\n"),
        )
    finally:
        guest.kill()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, help="a store to build into (or reuse)")
    parser.add_argument("--boots", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="rockpool-boot-bench-"))
    store_dir = args.store or scratch / "store"
    store = Store(store_dir)
    images = {}
    for label, spec in (("default", DEFAULT_SPEC), ("minimal", MINIMAL_SPEC)):
        _, built = rockpool_build(store_dir, spec=spec)
        images[label] = store.version(str(built["name"]), str(built["version"]))
    key = scratch / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    boots: dict[str, list[Boot]] = {"default": [], "minimal": []}
    for round_ in range(args.boots):  # in turn, so that both meet the same load
        for label in ("minimal", "default"):
            run_dir = scratch / f"{label}{round_}"
            boots[label].append(boot_once(images[label], key, run_dir, label == "default"))
    machine, date = machine_note(), time.strftime("%Y-%m-%d")
    results = {
        "machine": machine,
        "date": date,
        "images": {label: version.ref for label, version in images.items()},
        "boots": {label: [asdict(b) for b in runs] for label, runs in boots.items()},
    }
    print(json.dumps(results, indent=2))
    write_markdown(machine, date, boots)
    return 0


def mean(values: list[float | None]) -> float:
    return statistics.fmean(v for v in values if v is not None)


def write_markdown(machine: str, date: str, boots: dict[str, list[Boot]]) -> None:
    minimal, default = boots["minimal"], boots["default"]
    baseline = mean([b.multi_user_s for b in minimal])
    healthz = mean([b.ready_s for b in default])

    def runs(values: list[float | None]) -> str:
        return ", ".join(f"{v:.1f}" for v in values if v is not None) + " s"

    def row(what: str, values: list[float | None]) -> str:
        return f"| {what} | {runs(values)} | {mean(values) / baseline:.2f} |"

    code_server = [
        (b.code_server_listening_s or 0) - (b.code_server_started_s or 0) for b in default
    ]
    table = "\n".join(
        [
            row(
                "minimal image: QEMU start to multi-user.target (the baseline)",
                [b.multi_user_s for b in minimal],
            ),
            row("minimal image: QEMU start to SSH login", [b.ready_s for b in minimal]),
            row("minimal image: QEMU start to the kernel", [b.kernel_start_s for b in minimal]),
            row("default image: QEMU start to the kernel", [b.kernel_start_s for b in default]),
            row(
                "default image: QEMU start to multi-user.target", [b.multi_user_s for b in default]
            ),
            row(
                "default image: QEMU start to code-server's process",
                [b.code_server_started_s for b in default],
            ),
            row("**default image: QEMU start to /healthz 200**", [b.ready_s for b in default]),
            f"| code-server's own start (its process to 'HTTP server listening') "
            f"| {runs(list(code_server))} | |",
        ]
    )
    body = (
        f"Measured {date} on {machine}; {len(default)} boots of each image, in turn.\n\n"
        "| measure | runs | ratio to the baseline |\n| --- | --- | --- |\n"
        f"{table}\n\n"
        f"Boot to /healthz is {healthz / baseline:.2f} times the minimal image's boot to "
        "multi-user.target (target: at most 1.25).\n\n"
        "Slowest units of the last default boot (`systemd-analyze blame`):\n\n"
        + "\n".join(f"    {line.strip()}" for line in default[-1].blame if line.strip())
    )
    write_section("boot-bench", "First boot (`sudo .venv/bin/python -m bench.boot_bench`)", body)


if __name__ == "__main__":
    raise SystemExit(main())

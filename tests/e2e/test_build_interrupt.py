"""An interrupted build leaves no partial version and nothing running or mounted.

These run before the shared image is built (file order), in the same store, so the
shared build then shows that the next build after an interruption works.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rockpool.store import Store
from tests.e2e.conftest import DEFAULT_SPEC, rockpool_env

pytestmark = pytest.mark.vm
DEADLINE = 600.0


def existing_logs(store_home: Path) -> set[Path]:
    return set((store_home / "logs").glob("*.log"))


def start_build(store_home: Path) -> tuple[subprocess.Popen[str], set[Path]]:
    logs_before = existing_logs(store_home)
    build = subprocess.Popen(
        [
            *(sys.executable, "-m", "rockpool", "image", "build", str(DEFAULT_SPEC)),
            *("--force", "--no-lock"),
        ],
        env=rockpool_env(store_home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return build, logs_before


def wait_for_log(
    store_home: Path, build: subprocess.Popen[str], logs_before: set[Path], marker: str
) -> None:
    """Wait until this build's own log (not an earlier one) shows marker."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        assert build.poll() is None, (
            f"build ended early: {build.stderr.read() if build.stderr else ''}"
        )
        for log in existing_logs(store_home) - logs_before:
            if marker in log.read_text(errors="replace"):
                return
        time.sleep(0.5)  # poll interval for the log
    raise AssertionError(f"the build log never showed {marker!r}")


def build_leftovers(store_home: Path) -> list[str]:
    """Processes, mounts and loop devices that still refer to the store."""
    found = []
    root = str(store_home)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        # Only this store's: another build on the machine (mmdebstrap included: its
        # command line names its target in the store) is not a leftover of these tests.
        if root in cmdline or cwd.startswith(root):
            found.append(f"process {entry.name}: {cmdline[:120]}")
    found += [
        f"mount {line.split()[4]}"
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if root in line
    ]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    found += [f"loop {line}" for line in loops.splitlines() if root in line]
    return found


def wait_until_clean(store_home: Path) -> list[str]:
    deadline = time.monotonic() + 30
    while (left := build_leftovers(store_home)) and time.monotonic() < deadline:
        time.sleep(0.2)  # processes die asynchronously after their parent
    return left


def test_kill_9_during_bootstrap_leaves_no_version_process_or_mount(store_home: Path) -> None:
    build, logs_before = start_build(store_home)
    wait_for_log(store_home, build, logs_before, "installing remaining packages inside the chroot")
    os.kill(build.pid, signal.SIGKILL)
    build.wait()
    assert wait_until_clean(store_home) == []
    store = Store(store_home)
    assert store.versions("workspace") == [] or all(
        (v.path / "manifest.json").is_file() for v in store.versions("workspace")
    )
    assert store.latest_id("workspace") is None or store.resolve("workspace")
    # The dead build's directory is still there, and is swept by the next build.
    assert any(store.staging_dir.iterdir())


def test_ctrl_c_during_provision_cleans_up_at_once(store_home: Path) -> None:
    store = Store(store_home)
    before = [v.id for v in store.versions("workspace")]
    build, logs_before = start_build(store_home)
    wait_for_log(store_home, build, logs_before, "code-server: installing")
    os.kill(build.pid, signal.SIGINT)
    _, stderr = build.communicate(timeout=120)
    assert build.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr
    assert wait_until_clean(store_home) == []
    assert [v.id for v in store.versions("workspace")] == before
    assert list(store.staging_dir.iterdir()) == []  # swept: the killed one and its own

"""Suspend and resume on QEMU (TCG): the same guest comes back, a state is used once and
never copied, and a state that cannot be trusted, or a suspend cut short, ends in a
cold boot."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rockpool.errors import Conflict, NotFound
from rockpool.runtime import suspend
from rockpool.runtime.base import State
from rockpool.runtime.qemu import QemuRuntime
from rockpool.store import Store, Version
from tests.e2e.conftest import REPO
from tests.e2e.guest import wait_until
from tests.e2e.test_workspaces import Session, start

pytestmark = pytest.mark.vm
CLOCK_GAP = 5.0  # seconds between the suspend and the resume, at least
CLOCK_TOLERANCE = 1.5  # seconds a set clock may be off (SSH's round trip under TCG)


@pytest.fixture
def runtime(minimal_image: Version, store_home: Path) -> QemuRuntime:
    return QemuRuntime(Store(store_home))


def test_suspend_resumes_the_same_guest_and_falls_back_when_it_cannot(
    runtime: QemuRuntime, minimal_image: Version, store_home: Path, ssh_key: Path
) -> None:
    runtime.create("nap", minimal_image.name)
    directory = runtime.root / "nap"
    keys = ssh_key.with_suffix(".pub").read_text()
    try:
        session = start(runtime, "nap", ssh_key)
        sleeper = session.ssh("nohup sleep 100000 >/dev/null 2>&1 & echo $!").strip()
        session.ssh("echo before > ~/before.txt && sync")
        boot_id = session.ssh("cat /proc/sys/kernel/random/boot_id")

        suspended = runtime.stop("nap", suspend=True)
        suspended_at = time.time()
        assert suspended.state == State.SUSPENDED and suspended.endpoint is None
        assert runtime.status("nap").details["pid"] is None  # no QEMU is left
        saved = suspend.directory(directory)
        assert stat.S_IMODE(saved.stat().st_mode) == 0o700
        assert stat.S_IMODE((saved / suspend.STATE).stat().st_mode) == 0o600  # guest RAM
        # A suspended workspace holds its image, as a stopped one does.
        held = runtime.holdings().files
        assert minimal_image.output_path("qcow2").resolve() in held

        # A clone takes the disk only, and the source keeps its state.
        clone = runtime.clone("nap", "nap-copy")
        assert clone.state == State.STOPPED
        assert not suspend.directory(runtime.root / "nap-copy").exists()
        assert runtime.status("nap").state == State.SUSPENDED

        # Time passes while a workspace is suspended; this gap is what the guest's clock
        # must catch up on, so it is made long enough to tell a set clock from one left.
        time.sleep(max(0.0, CLOCK_GAP - (time.time() - suspended_at)))
        resumed = runtime.start("nap", {"ROCKPOOL_TEAM": "qa"}, keys)
        assert resumed.state == State.RUNNING
        last_start = resumed.details["last_start"]
        assert (last_start["resumed"], last_start["reason"]) == (True, None)
        assert not saved.exists()  # used once
        # The guest's clock came back where it stopped, and was set to the host's.
        assert last_start["clock"]["set"] is True
        assert last_start["clock"]["was_off_seconds"] < -CLOCK_GAP + 1
        session = Session(runtime, "nap", ssh_key)
        session.wait_ready()
        before = time.time()
        guest_now = float(session.ssh("date +%s.%N"))
        assert before - CLOCK_TOLERANCE < guest_now < time.time() + CLOCK_TOLERANCE
        assert session.ssh("cat /proc/sys/kernel/random/boot_id") == boot_id
        assert session.ssh(f"kill -0 {sleeper} && cat ~/before.txt") == "before\n"

        # Other ROCKPOOL_* values than the suspended boot had: a cold boot, and why.
        assert runtime.stop("nap", suspend=True).state == State.SUSPENDED
        cold = runtime.start("nap", {"ROCKPOOL_TEAM": "other"}, keys)
        assert cold.details["last_start"]["resumed"] is False
        assert "ROCKPOOL_*" in cold.details["last_start"]["reason"]
        assert not saved.exists()

        # kill -9 of a suspend while it writes: the half-written state is never used,
        # and the next start boots cold.
        suspending = subprocess.Popen(
            [sys.executable, "-m", "rockpool", "workspace", "stop", "--suspend", "nap"],
            cwd=REPO,
            env={**os.environ, "ROCKPOOL_HOME": str(store_home)},
        )
        wait_until(lambda: (saved / suspend.PARTIAL).exists(), 60, "the suspend's state file")
        os.kill(suspending.pid, signal.SIGKILL)
        suspending.wait()
        # Killed mid-stream, QEMU is left paused; killed after QEMU quit, it is gone.
        left = runtime.status("nap").state
        assert left in (State.PAUSED, State.STOPPED)
        assert suspend.interrupted(directory)
        if left == State.PAUSED:  # a paused guest is no guest to suspend, and stays
            with pytest.raises(Conflict, match="no running guest"):
                runtime.stop("nap", suspend=True)
            assert runtime.status("nap").state == State.PAUSED
        again = runtime.start("nap", {"ROCKPOOL_TEAM": "qa"}, keys)
        assert again.details["last_start"]["resumed"] is False
        assert not saved.exists()
        session = Session(runtime, "nap", ssh_key)
        session.wait_ready()
        assert session.ssh("cat /proc/sys/kernel/random/boot_id") != boot_id
        assert session.ssh("cat ~/before.txt") == "before\n"
        # This start's values reach the guest, not the previous boot's ("other").
        assert 'ROCKPOOL_TEAM="qa"' in session.ssh("sudo cat /run/rockpool/env")
    finally:
        for name in ("nap", "nap-copy"):
            with contextlib.suppress(NotFound):
                runtime.remove(name, force=True)

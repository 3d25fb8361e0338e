"""Workspaces on QEMU from the shared default image: persistence, crash safety, clones
that share blocks but not identity, and image updates that reach new workspaces only."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rockpool.errors import Conflict, InvalidInput, NotFound, RockpoolError
from rockpool.runtime.base import State, Workspace
from rockpool.runtime.qemu import QemuRuntime
from rockpool.store import Store, Version
from tests.e2e.conftest import MINIMAL_SPEC, REPO, run_rockpool
from tests.e2e.guest import BOOT_DEADLINE, ssh_argv, wait_until

# The lifecycle runs on the minimal image (no code-server): every boot here waits for
# SSH; code-server's own tests, in test_image.py, boot the default image.
pytestmark = pytest.mark.vm


@pytest.fixture
def runtime(minimal_image: Version, store_home: Path) -> QemuRuntime:
    return QemuRuntime(Store(store_home))


class Session:
    """SSH and HTTP to a running workspace through its reported endpoint."""

    def __init__(self, runtime: QemuRuntime, name: str, key: Path) -> None:
        self.runtime, self.name, self.key = runtime, name, key

    def ssh(self, command: str, check: bool = True) -> str:
        endpoint = self.runtime.endpoint(self.name)
        result = subprocess.run(
            ssh_argv(self.key, endpoint.ssh_port or 0, "coder", command),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{command!r}: {result.returncode} {result.stderr}")
        return result.stdout

    def wait_ready(self) -> None:
        """code-server's /healthz where the image has code-server, then SSH."""
        image = self.runtime.store.resolve(self.runtime.status(self.name).image)
        if image.manifest["spec"]["code_server_version"]:
            wait_until(self._healthy, BOOT_DEADLINE, f"{self.name} /healthz")
        wait_until(self._ssh_ok, BOOT_DEADLINE, f"{self.name} ssh")

    def _running(self) -> None:
        if self.runtime.status(self.name).state != State.RUNNING:
            raise AssertionError(f"{self.name} stopped while booting")

    def _healthy(self) -> bool:
        self._running()
        url = f"{self.runtime.endpoint(self.name).url}healthz"
        probe = subprocess.run(["curl", "-fsS", "-o", "/dev/null", url], capture_output=True)
        return probe.returncode == 0

    def _ssh_ok(self) -> bool:
        self._running()
        try:
            self.ssh("true")
            return True
        except AssertionError:
            return False


def start(runtime: QemuRuntime, name: str, key: Path) -> Session:
    runtime.start(name, {"ROCKPOOL_TEAM": "qa"}, key.with_suffix(".pub").read_text())
    session = Session(runtime, name, key)
    session.wait_ready()
    return session


def test_bad_input_leaves_nothing(runtime: QemuRuntime, minimal_image: Version) -> None:
    with pytest.raises(InvalidInput):
        runtime.create("Not_Valid", minimal_image.name)
    with pytest.raises(NotFound):
        runtime.create("ok-name", "no-such-image")
    with pytest.raises(NotFound):
        runtime.create("ok-name", f"{minimal_image.name}:0123456789ab")
    with pytest.raises(NotFound):
        runtime.start("never-created")
    runtime.create("dup", minimal_image.name)
    with pytest.raises(Conflict):
        runtime.create("dup", minimal_image.name)
    runtime.remove("dup")
    # Two creates of one name at once: exactly one wins, nothing half-made remains.
    results: list[object] = []

    def create() -> None:
        try:
            results.append(runtime.create("race", minimal_image.name))
        except RockpoolError as exc:
            results.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(isinstance(r, Workspace) for r in results) == 1
    assert all(isinstance(r, Workspace | Conflict) for r in results)
    assert [p.name for p in runtime.root.iterdir() if p.name.startswith(".")] == []
    runtime.remove("race")
    assert [w.name for w in runtime.list()] == []


def backing_chain(disk: Path) -> list[str]:
    info = subprocess.run(
        ["qemu-img", "info", "--backing-chain", "-U", "--output=json", str(disk)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [entry["filename"] for entry in json.loads(info)]


def test_persistence_crash_and_clone(
    runtime: QemuRuntime, minimal_image: Version, ssh_key: Path, tmp_path: Path
) -> None:
    created = runtime.create("persist", minimal_image.name)
    assert created.image == minimal_image.ref and created.state == State.STOPPED
    disk = Path(created.details["disk"])
    assert backing_chain(disk)[1] == str(minimal_image.output_path("qcow2"))
    assert disk.stat().st_size < 4 << 20  # an overlay, not a copy
    try:
        session = start(runtime, "persist", ssh_key)
        pid = runtime.status("persist").details["pid"]
        assert runtime.start("persist").details["pid"] == pid  # no second VM on the disk
        assert runtime.endpoint("persist").host == "127.0.0.1"
        # kill -9 while writing: what was synced survives, and the disk checks clean.
        session.ssh(
            "echo kept > ~/note.txt && echo synced > ~/synced.txt && sync && "
            "(nohup dd if=/dev/urandom of=/home/coder/churn bs=1M count=400 "
            ">/dev/null 2>&1 &)"
        )
        subprocess.run(["kill", "-9", str(runtime.status("persist").details["pid"])], check=True)
        wait_until(lambda: runtime.status("persist").state == State.STOPPED, 30, "QEMU exit")
        session = start(runtime, "persist", ssh_key)
        assert session.ssh("cat ~/synced.txt ~/note.txt") == "synced\nkept\n"
        host_key = session.ssh("cat /etc/ssh/ssh_host_ed25519_key.pub")
        machine_id = session.ssh("cat /etc/machine-id")
        with pytest.raises(Conflict, match="running"):
            runtime.clone("persist", "copy")
        # A clean stop keeps even what the guest had not synced (the next boot reads it).
        session.ssh("echo unsynced > ~/late.txt")
        stopped = runtime.stop("persist")
        assert stopped.state == State.STOPPED and stopped.endpoint is None
        assert runtime.stop("persist").state == State.STOPPED  # stopping again: no-op
        assert_filesystem_clean(disk, minimal_image, tmp_path)

        clone = runtime.clone("persist", "copy")
        assert clone.cloned_from == "persist" and clone.image == minimal_image.ref
        clone_disk = Path(clone.details["disk"])
        layer = backing_chain(clone_disk)[1]
        assert backing_chain(disk)[1] == layer  # both now sit on one shared, frozen layer
        assert clone_disk.stat().st_size < 4 << 20

        source = start(runtime, "persist", ssh_key)
        copy = start(runtime, "copy", ssh_key)  # side by side
        assert copy.ssh("cat ~/note.txt") == "kept\n"
        assert source.ssh("cat ~/late.txt") == "unsynced\n"
        assert copy.ssh("hostname").strip() == "copy"
        assert source.ssh("cat /etc/ssh/ssh_host_ed25519_key.pub") == host_key
        assert source.ssh("cat /etc/machine-id") == machine_id
        assert copy.ssh("cat /etc/ssh/ssh_host_ed25519_key.pub") != host_key
        assert copy.ssh("cat /etc/machine-id").strip() not in ("", machine_id.strip())
    finally:
        for name in ("persist", "copy"):
            with contextlib.suppress(NotFound):
                runtime.remove(name, force=True)
    assert not list(runtime.layers.glob("*.qcow2")), "unused layers were left behind"


def assert_filesystem_clean(disk: Path, image: Version, tmp_path: Path) -> None:
    raw = tmp_path / "check.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    offset = image.manifest["disk"]["root_offset"]
    fsck = subprocess.run(
        ["e2fsck", "-fn", f"{raw}?offset={offset}"], capture_output=True, text=True
    )
    raw.unlink()
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_image_updates_reach_new_workspaces_only(
    runtime: QemuRuntime, minimal_image: Version, store_home: Path, ssh_key: Path, tmp_path: Path
) -> None:
    runtime.create("old", minimal_image.name)
    try:
        start(runtime, "old", ssh_key)
        # An update of setup.sh: a new version of the same image, from the cached bootstrap.
        script = tmp_path / "setup.sh"
        script.write_text(
            (REPO / "images/scripts/setup.sh").read_text() + "\necho 2 > /etc/rockpool-update\n"
        )
        updated = tmp_path / "workspace.toml"
        updated.write_text(f'extends = "{MINIMAL_SPEC}"\n[provision]\nscript = "{script}"\n')
        # The image's archive state: an unlocked build keys its bootstrap on the archive's
        # Release date, which Debian may move between the two builds.
        same_archive = {"SOURCE_DATE_EPOCH": str(minimal_image.manifest["source_date_epoch"])}
        rebuilt = run_rockpool(
            store_home,
            *("image", "build", str(updated), "--json", "--no-verify"),
            timeout=3600,
            env=same_archive,
        )
        assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
        new_ref = json.loads(rebuilt.stdout)["image"]
        assert new_ref != minimal_image.ref
        assert json.loads(rebuilt.stdout)["stages"]["bootstrap"] == "cached"
        assert runtime.status("old").state == State.RUNNING
        assert runtime.status("old").image == minimal_image.ref
        assert runtime.create("new", minimal_image.name).image == new_ref

        refused = run_rockpool(store_home, "image", "rm", minimal_image.ref)
        assert refused.returncode == 6 and "old" in refused.stderr
        gc = json.loads(run_rockpool(store_home, "image", "gc", "--json").stdout)
        assert minimal_image.ref not in gc["removed"]
        assert any(k["image"] == minimal_image.ref and k["held_by"] == ["old"] for k in gc["kept"])
        runtime.remove("old", force=True)
        gc = json.loads(run_rockpool(store_home, "image", "gc", "--json").stdout)
        assert minimal_image.ref in gc["removed"]
        assert not minimal_image.path.exists()
    finally:
        for name in ("old", "new"):
            with contextlib.suppress(NotFound):
                runtime.remove(name, force=True)


def cli_env(store_home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "ROCKPOOL_HOME": str(store_home), **extra}


def test_a_kvm_start_that_fails_ends_on_tcg_and_serves(
    runtime: QemuRuntime, minimal_image: Version, store_home: Path, ssh_key: Path
) -> None:
    """KVM forced past the probe: where it fails, as it does on these machines (QEMU
    aborts, or the guest stops in internal-error), start restarts the guest under TCG
    by itself and the workspace says why."""
    runtime.create("kvmfall", minimal_image.name)
    try:
        started = subprocess.run(
            [
                *(sys.executable, "-m", "rockpool", "-q", "workspace", "start", "kvmfall"),
                *("--json", "--authorized-keys", str(ssh_key.with_suffix(".pub"))),
            ],
            env=cli_env(store_home, ROCKPOOL_ACCEL="kvm"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert started.returncode == 0, started.stderr
        accelerator = json.loads(started.stdout)["details"]["accelerator"]
        if accelerator["name"] == "kvm":
            pytest.skip("KVM really runs guests on this host: there is no failure to recover")
        assert accelerator["name"] == "tcg"
        assert "a KVM guest failed at start" in accelerator["reason"]
        Session(runtime, "kvmfall", ssh_key).wait_ready()  # SSH answers under TCG
        assert runtime.status("kvmfall").details["accelerator"] == accelerator
        # The verdict holds for this boot of the host: an automatic start uses TCG.
        runtime.stop("kvmfall")
        again = runtime.start("kvmfall")
        assert again.details["accelerator"]["name"] == "tcg"
    finally:
        runtime.remove("kvmfall", force=True)


def test_sigterm_stops_the_cli_not_the_vm_and_a_paused_guest_stops_at_once(
    runtime: QemuRuntime, minimal_image: Version, store_home: Path
) -> None:
    runtime.create("signals", minimal_image.name)
    try:
        runtime.start("signals")  # still in its firmware: deaf to the power button
        stop = subprocess.Popen(
            [sys.executable, "-m", "rockpool", "workspace", "stop", "signals", "--timeout", "600"],
            env=cli_env(store_home),
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(lambda: stop.poll() is None and _stop_waiting(stop.pid), 60, "stop to wait")
        stop.terminate()
        _, stderr = stop.communicate(timeout=60)
        assert stop.returncode == 143, stderr
        assert "interrupted by SIGTERM" in stderr and "Traceback" not in stderr
        assert runtime.status("signals").state == State.RUNNING  # not hard-killed

        vm = runtime._vm(
            "signals", json.loads((runtime.root / "signals/workspace.json").read_text())
        )
        vm.qmp("stop")  # paused, as a debugger or a migration leaves it
        status = runtime.status("signals")
        assert status.state == State.PAUSED and status.endpoint is None
        assert status.details["qemu_status"] == "paused"
        result = run_rockpool(store_home, "workspace", "stop", "signals", "--timeout", "600")
        assert result.returncode == 0, result.stderr  # at once: a paused guest cannot power off
        assert runtime.status("signals").state == State.STOPPED
    finally:
        runtime.remove("signals", force=True)


def _stop_waiting(pid: int) -> bool:
    """The stop command is past its QMP call, waiting for the guest to power off: it
    sleeps between looks at the process (not in a QMP read)."""
    try:
        stack = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False
    return stack in ("hrtimer_nanosleep", "do_nanosleep", "clock_nanosleep")

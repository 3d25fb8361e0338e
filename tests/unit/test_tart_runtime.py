"""The Tart runtime against tests/standins/tart, a stand-in for Tart's CLI (Tart itself
needs macOS and Virtualization.framework; see tests/standins/README.md).

Every tart invocation is recorded by the stand-in, so these tests check the exact command
lines the runtime issues as well as what it leaves in $TART_HOME and the store.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rockpool.errors import (
    CommandFailed,
    Conflict,
    InvalidInput,
    MissingTool,
    NotFound,
    RockpoolError,
)
from rockpool.runtime import tart as runtime_module
from rockpool.runtime.base import State
from rockpool.runtime.tart import TartRuntime, TartVMError
from rockpool.store import Store, Version
from rockpool.tools import CLEAN_PATH
from rockpool.tools import tart as tart_cli
from tests.keys import PUBLIC_KEY

STANDINS = Path(__file__).resolve().parents[1] / "standins"
STANDIN = STANDINS / "tart"
VERSION_ID = "0123456789ab"
IMAGE_VM = f"rockpool-workspace-arm64-{VERSION_ID}"
BUILT_MAC = "02:00:00:00:00:01"
DISK_HEAD = b"ROCKPOOL TEST DISK"
DISK_SIZE = 64 << 20
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
POLLING = ("list", "ip")  # read-only commands the runtime repeats as it likes


@dataclass
class Tart:
    """The stand-in's world for one test: TART_HOME, its invocation log, the store."""

    home: Path
    log: Path
    store: Store

    def calls(self, *, polling: bool = False) -> list[list[str]]:
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        calls = [json.loads(line) for line in lines]
        return [c for c in calls if polling or (c and c[0] not in POLLING)]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The stand-in run directly, as a user at a terminal would (not through rockpool)."""
        env = {**os.environ, "PATH": CLEAN_PATH}  # whatever PATH the test left
        return subprocess.run(
            [str(STANDIN), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
            env=env,
        )

    def vms(self) -> dict[str, dict[str, object]]:
        listed = self.cli("list", "--format", "json", "--source", "local")
        return {str(e["Name"]): e for e in json.loads(listed.stdout)}

    def vm_dir(self, name: str) -> Path:
        return self.home / "vms" / name


@pytest.fixture
def tart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Tart]:
    monkeypatch.setenv("PATH", f"{STANDINS}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("TART_HOME", str(tmp_path / "tart-home"))
    monkeypatch.setenv("TART_STANDIN_LOG", str(tmp_path / "tart-calls.jsonl"))
    monkeypatch.setenv("TART_STANDIN_IP_DELAY_SECONDS", "0.1")
    monkeypatch.setenv("TART_STANDIN_MAX_RUN_SECONDS", "60")  # nothing outlives a lost test
    for name in (
        "TART_STANDIN_FAIL_RUN",
        "TART_STANDIN_DHCP_CLIENT_ID",
        "TART_STANDIN_GUEST_IGNORES_STOP",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ROCKPOOL_HOME", str(tmp_path / "store"))
    world = Tart(tmp_path / "tart-home", tmp_path / "tart-calls.jsonl", Store.default())
    yield world
    for name, entry in world.vms().items():  # stop every VM a test left running
        if entry["State"] == "running":
            world.cli("stop", name, "--timeout", "2")


def land_version(store: Store, *, architecture: str = "arm64", tart_output: bool = True) -> Version:
    """A store version as a build lands it, with a small sparse disk in its tart output."""
    prepared = store.root / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "disk.raw").write_bytes(DISK_HEAD)
    outputs: dict[str, dict[str, object]] = {"raw": {"file": "disk.raw", "size": len(DISK_HEAD)}}
    if tart_output:
        bundle = prepared / "tart"
        bundle.mkdir()
        config = {
            "version": 1,
            "os": "linux",
            "arch": architecture,
            "cpuCountMin": 2,
            "cpuCount": 2,
            "memorySizeMin": 4 << 30,
            "memorySize": 4 << 30,
            "macAddress": BUILT_MAC,
            "display": {"width": 1024, "height": 768},
            "diskFormat": "raw",
        }
        (bundle / "config.json").write_text(json.dumps(config))
        with open(bundle / "disk.img", "wb") as disk:
            disk.write(DISK_HEAD)
            disk.truncate(DISK_SIZE)
        outputs["tart"] = {"file": "tart"}
    manifest = {
        "created": "2026-01-01T00:00:00+00:00",
        "architecture": architecture,
        "outputs": outputs,
    }
    name = "workspace-arm64" if architecture == "arm64" else "workspace"
    return store.land(name, VERSION_ID, prepared, manifest)


def config_disk_env(runtime: TartRuntime, name: str) -> dict[str, str]:
    image = runtime.root / name / "config.img"
    text = subprocess.run(
        ["mtype", "-i", str(image), "::env"],
        capture_output=True,
        text=True,
        check=True,
        env={"MTOOLS_SKIP_CHECK": "1", "PATH": os.environ["PATH"]},
    ).stdout
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def record(runtime: TartRuntime, name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((runtime.root / name / "workspace.json").read_text())
    return data


def run_call(runtime: TartRuntime, name: str) -> list[str]:
    disk = f"{runtime.root / name / 'config.img'}:ro"
    return ["run", name, "--no-graphics", "--net-softnet", "--disk", disk]


# ---- install --------------------------------------------------------------------------------


def test_install_keeps_tarts_nvram_and_mac_and_takes_our_disk_and_config(
    tart: Tart, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = land_version(tart.store)
    runtime = TartRuntime(tart.store)
    created_macs: list[str] = []
    copy_disk = tart_cli.copy_disk

    def copy_disk_seeing_the_created_vm(source: Path, target: Path) -> None:
        created = json.loads((target.parent / "config.json").read_text())
        created_macs.append(created["macAddress"])  # what `tart create` generated
        copy_disk(source, target)

    monkeypatch.setattr(tart_cli, "copy_disk", copy_disk_seeing_the_created_vm)
    assert runtime.install_image(version) == IMAGE_VM

    calls = tart.calls()
    assert len(calls) == 2
    create, rename = calls
    assert create[:2] == ["create", "--linux"]
    assert re.fullmatch(r"rockpool-tmp-[0-9a-f]{12}", create[2])
    assert rename == ["rename", create[2], IMAGE_VM]
    assert set(tart.vms()) == {IMAGE_VM}

    vm = tart.vm_dir(IMAGE_VM)
    assert b"stand-in" in (vm / "nvram.bin").read_bytes()  # tart create's, kept
    disk = vm / "disk.img"
    assert disk.stat().st_size == DISK_SIZE
    assert disk.read_bytes()[: len(DISK_HEAD)] == DISK_HEAD
    assert disk.stat().st_blocks * 512 < DISK_SIZE // 2  # copied sparse
    config = json.loads((vm / "config.json").read_text())
    built = json.loads((version.output_path("tart") / "config.json").read_text())
    assert built.pop("macAddress") == BUILT_MAC
    assert [config.pop("macAddress")] == created_macs and MAC.match(created_macs[0])
    assert config == built  # ours, apart from the MAC tart create generated

    # Installed already: nothing more than a look at tart list.
    assert runtime.install_image(version) == IMAGE_VM
    assert len(tart.calls()) == 2


def test_install_never_leaves_a_half_installed_vm(
    tart: Tart, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = land_version(tart.store)
    runtime = TartRuntime(tart.store)

    def broken_copy(source: Path, target: Path) -> None:
        raise CommandFailed(["cp", str(source), str(target)], 1, "cp: No space left on device")

    with monkeypatch.context() as patch, pytest.raises(CommandFailed, match="No space left"):
        patch.setattr(tart_cli, "copy_disk", broken_copy)
        runtime.install_image(version)
    create, delete = tart.calls()
    assert delete == ["delete", create[2]]
    assert tart.vms() == {}

    # An install killed outright leaves its temporary VM; the next install removes it.
    assert tart.cli("create", "--linux", "rockpool-tmp-abandoned").returncode == 0
    runtime.install_image(version)
    assert ["delete", "rockpool-tmp-abandoned"] in tart.calls()
    assert set(tart.vms()) == {IMAGE_VM}


@pytest.mark.parametrize(
    ("architecture", "tart_output", "problem"),
    [("amd64", True, "built for amd64"), ("arm64", False, "has no tart output")],
)
def test_images_tart_cannot_run(
    tart: Tart, architecture: str, tart_output: bool, problem: str
) -> None:
    version = land_version(tart.store, architecture=architecture, tart_output=tart_output)
    runtime = TartRuntime(tart.store)
    for attempt in (
        lambda: runtime.install_image(version),
        lambda: runtime.create("alice", version.ref),
    ):
        with pytest.raises(InvalidInput, match=problem) as caught:
            attempt()
        assert caught.value.hint is not None and "images/workspace-arm64.toml" in caught.value.hint
    assert tart.calls(polling=True) == []
    assert not (runtime.root / "alice").exists()


# ---- the workspace life cycle ---------------------------------------------------------------


def test_create_start_stop_remove(tart: Tart) -> None:
    land_version(tart.store)
    runtime = TartRuntime(tart.store)

    created = runtime.create("alice", "workspace-arm64")
    assert created.state == State.STOPPED and created.image == f"workspace-arm64:{VERSION_ID}"
    assert tart.calls()[-1] == ["clone", IMAGE_VM, "alice"]
    rec = record(runtime, "alice")
    assert rec["image"] == f"workspace-arm64:{VERSION_ID}" and rec["cloned_from"] is None
    assert re.fullmatch(r"[0-9a-f]{32}", str(rec["instance_id"])) and rec["created"]

    keys = PUBLIC_KEY
    started = runtime.start("alice", {"ROCKPOOL_TEAM": "blue"}, authorized_keys=keys)
    assert tart.calls()[-1] == run_call(runtime, "alice")
    assert started.state == State.RUNNING and started.endpoint is not None
    assert started.endpoint.network == "softnet"  # isolated by default: Tart's Softnet
    assert re.fullmatch(r"192\.168\.64\.\d+", started.endpoint.host)
    assert (started.endpoint.port, started.endpoint.ssh_port) == (8080, 22)
    assert started.endpoint.url == f"http://{started.endpoint.host}:8080/"
    assert runtime.endpoint("alice") == started.endpoint
    assert config_disk_env(runtime, "alice") == {
        "ROCKPOOL_WORKSPACE_NAME": "alice",
        "ROCKPOOL_INSTANCE_ID": str(rec["instance_id"]),
        "ROCKPOOL_TEAM": "blue",
    }
    assert tart.vms()["alice"]["State"] == "running"

    # Running already: start changes nothing and runs nothing.
    calls = len(tart.calls())
    assert runtime.start("alice") == started
    assert len(tart.calls()) == calls

    # Only workspaces are listed, not the installed image's VM.
    assert [w.name for w in runtime.list()] == ["alice"]
    assert runtime.status("alice").state == State.RUNNING

    # A clean shutdown: Tart's guest stop request (SIGUSR2 to `tart run`), no `tart stop`.
    stopped = runtime.stop("alice", timeout=5)
    assert tart.calls()[-1] == ["<SIGUSR2>", "alice"]
    assert stopped.state == State.STOPPED and stopped.endpoint is None
    with pytest.raises(Conflict, match="not running"):
        runtime.endpoint("alice")
    calls = len(tart.calls())
    runtime.stop("alice")  # stopped already: a no-op
    assert len(tart.calls()) == calls

    runtime.remove("alice")
    assert tart.calls()[-1] == ["delete", "alice"]
    assert set(tart.vms()) == {IMAGE_VM}
    assert runtime.list() == []
    with pytest.raises(NotFound):
        runtime.status("alice")


def test_clone_is_a_new_machine(tart: Tart) -> None:
    land_version(tart.store)
    runtime = TartRuntime(tart.store)
    runtime.create("alice", "workspace-arm64")
    runtime.start("alice", authorized_keys=PUBLIC_KEY)

    # A running source is refused, and so is removing it without force.
    with pytest.raises(Conflict, match="running"):
        runtime.clone("alice", "bob")
    with pytest.raises(Conflict, match="running"):
        runtime.remove("alice")
    assert not (runtime.root / "bob").exists() and "bob" not in tart.vms()

    runtime.stop("alice")
    bob = runtime.clone("alice", "bob")
    assert tart.calls()[-1] == ["clone", "alice", "bob"]
    assert bob.cloned_from == "alice" and bob.image == f"workspace-arm64:{VERSION_ID}"
    alice_rec, bob_rec = record(runtime, "alice"), record(runtime, "bob")
    assert bob_rec["cloned_from"] == "alice"
    assert bob_rec["instance_id"] != alice_rec["instance_id"]

    runtime.start("bob")
    env = config_disk_env(runtime, "bob")
    assert env["ROCKPOOL_INSTANCE_ID"] == bob_rec["instance_id"]
    assert env["ROCKPOOL_WORKSPACE_NAME"] == "bob"
    assert (runtime.root / "bob" / "authorized_keys").read_text() == PUBLIC_KEY + "\n"

    def mac(vm: str) -> str:
        return str(json.loads((tart.vm_dir(vm) / "config.json").read_text())["macAddress"])

    assert mac("bob") != mac("alice")  # its own DHCP lease and IP

    runtime.remove("bob", force=True)
    assert tart.calls()[-2:] == [["stop", "bob", "--timeout", "30"], ["delete", "bob"]]
    assert [w.name for w in runtime.list()] == ["alice"]


# ---- what goes wrong ------------------------------------------------------------------------


def test_a_vm_that_is_gone(tart: Tart) -> None:
    land_version(tart.store)
    runtime = TartRuntime(tart.store)
    with pytest.raises(NotFound, match="no workspace named 'nobody'"):
        runtime.start("nobody")
    runtime.create("alice", "workspace-arm64")
    assert tart.cli("delete", "alice").returncode == 0  # behind rockpool's back

    with pytest.raises(NotFound, match="no Tart VM") as caught:
        runtime.start("alice")
    assert caught.value.hint == "remove the workspace: rockpool workspace rm alice"
    assert runtime.status("alice").details["tart_state"] == "missing"
    runtime.remove("alice")
    assert runtime.list() == []


def test_tarts_errors_become_rockpools(tart: Tart) -> None:
    with pytest.raises(NotFound, match="Tart has no VM named 'ghost'"):
        tart_cli.run_tart("stop", "ghost")
    assert tart.cli("create", "--linux", "carol").returncode == 0
    with pytest.raises(Conflict, match="Tart VM 'carol' is not running"):
        tart_cli.run_tart("stop", "carol")
    with pytest.raises(CommandFailed, match="target VM carol already exists") as caught:
        tart_cli.run_tart("rename", "carol", "carol")
    assert caught.value.returncode == 64


def test_a_fresh_nvram_for_tart_pull(tart: Tart) -> None:
    nvram = tart_cli.fresh_nvram()
    assert b"not a VZEFIVariableStore" in nvram  # the stand-in's placeholder
    create, delete = tart.calls()
    assert create[:2] == ["create", "--linux"] and delete == ["delete", create[2]]
    assert tart.vms() == {}


@pytest.mark.parametrize(
    "guest", [{"TART_STANDIN_IP_DELAY_SECONDS": "never"}, {"TART_STANDIN_DHCP_CLIENT_ID": "duid"}]
)
def test_running_without_an_ip_yet(
    tart: Tart, monkeypatch: pytest.MonkeyPatch, guest: dict[str, str]
) -> None:
    for key, value in guest.items():
        monkeypatch.setenv(key, value)
    land_version(tart.store)
    runtime = TartRuntime(tart.store, ip_timeout=0.5)
    runtime.create("alice", "workspace-arm64")

    with pytest.raises(TartVMError, match="is running but has no IP address yet") as caught:
        runtime.start("alice")
    assert caught.value.hint is not None
    assert "MAC-based DHCP client id" in caught.value.hint
    assert "rockpool workspace status alice" in caught.value.hint

    status = runtime.status("alice")  # left running: the guest may still get its lease
    assert status.state == State.RUNNING and status.endpoint is None
    with pytest.raises(TartVMError, match="no IP address yet"):
        runtime.endpoint("alice")


def test_run_that_dies_at_once(tart: Tart, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TART_STANDIN_FAIL_RUN", "1")
    land_version(tart.store)
    runtime = TartRuntime(tart.store, ip_timeout=10.0)
    runtime.create("alice", "workspace-arm64")

    with pytest.raises(TartVMError, match="`tart run` stopped right after it started") as caught:
        runtime.start("alice")
    assert "The virtual machine failed to start" in caught.value.message  # the log's tail
    assert caught.value.hint is not None and "tart-run.log" in caught.value.hint
    assert runtime.status("alice").state == State.STOPPED


def test_names_tart_or_rockpool_rejects(tart: Tart) -> None:
    land_version(tart.store)
    runtime = TartRuntime(tart.store)
    runtime.create("alice", "workspace-arm64")
    for name, problem in [
        ("Bad_Name", "invalid workspace name"),
        ("ghcr.io/org/image:latest", "invalid workspace name"),  # Tart: a remote OCI name
        ("a:b", "invalid workspace name"),
        ("..", "invalid workspace name"),
        (IMAGE_VM, "kept for the Tart VMs of installed images"),
        ("rockpool-tmp-0123", "kept for the Tart VMs of installed images"),
    ]:
        with pytest.raises(InvalidInput, match=problem):
            runtime.create(name, "workspace-arm64")
        with pytest.raises(InvalidInput, match=problem):
            runtime.clone("alice", name)
    assert set(tart.vms()) == {IMAGE_VM, "alice"}
    assert [call[0] for call in tart.calls()] == ["create", "rename", "clone"]


def test_names_taken(tart: Tart) -> None:
    land_version(tart.store)
    runtime = TartRuntime(tart.store)
    runtime.create("alice", "workspace-arm64")
    with pytest.raises(Conflict, match="a workspace named 'alice' exists already"):
        runtime.create("alice", "workspace-arm64")

    # A Tart VM that is no workspace is neither taken over nor deleted.
    assert tart.cli("create", "--linux", "carol").returncode == 0
    attempts: list[Callable[[], object]] = [
        lambda: runtime.create("carol", "workspace-arm64"),
        lambda: runtime.clone("alice", "carol"),
    ]
    for attempt in attempts:
        with pytest.raises(Conflict, match="not a rockpool workspace"):
            attempt()
    assert "carol" in tart.vms() and not (runtime.root / "carol").exists()
    assert ["delete", "carol"] not in tart.calls()

    # A create killed before it wrote the record does not hold the name for good.
    (runtime.root / "dave").mkdir()
    assert runtime.create("dave", "workspace-arm64").name == "dave"


def test_create_leaves_nothing_when_it_fails(tart: Tart, monkeypatch: pytest.MonkeyPatch) -> None:
    land_version(tart.store)
    runtime = TartRuntime(tart.store)
    runtime.install_image(tart.store.resolve("workspace-arm64"))

    run_tart = tart_cli.run_tart

    def clone_fails(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        if args[0] == "clone":
            raise CommandFailed(["tart", *args], 1, "Error: out of space")
        return run_tart(*args, check=check)

    with monkeypatch.context() as patch:
        patch.setattr(tart_cli, "run_tart", clone_fails)
        with pytest.raises(CommandFailed, match="out of space"):
            runtime.create("alice", "workspace-arm64")
    assert not (runtime.root / "alice").exists() and "alice" not in tart.vms()

    def record_fails(path: Path, data: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(runtime_module, "write_json_atomic", record_fails)
        with pytest.raises(OSError, match="No space"):
            runtime.create("alice", "workspace-arm64")
    assert tart.calls()[-2:] == [["clone", IMAGE_VM, "alice"], ["delete", "alice"]]
    assert not (runtime.root / "alice").exists() and "alice" not in tart.vms()


def test_without_tart(tart: Tart, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    land_version(tart.store)
    empty = tmp_path / "no-tart-here"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    runtime = TartRuntime(tart.store)
    for attempt in (
        lambda: runtime.create("alice", "workspace-arm64"),
        runtime.list,
        lambda: runtime.install_image(tart.store.resolve("workspace-arm64")),
    ):
        with pytest.raises(MissingTool, match="'tart' command") as caught:
            attempt()
        assert caught.value.hint == "install Tart on macOS: brew install cirruslabs/cli/tart"
        assert isinstance(caught.value, RockpoolError)
    assert not (runtime.root / "alice").exists()


def test_the_stand_in_says_what_it_is(tart: Tart) -> None:
    assert "rockpool stand-in, not Tart" in tart.cli("--version").stdout
    missing = tart.cli("stop", "ghost")
    assert (missing.returncode, missing.stderr) == (2, 'the specified VM "ghost" does not exist\n')


def test_a_guest_that_ignores_the_stop_request_is_stopped_by_tart(
    tart: Tart, monkeypatch: pytest.MonkeyPatch
) -> None:
    land_version(tart.store)
    runtime = TartRuntime(tart.store)
    runtime.create("dave", "workspace-arm64")
    monkeypatch.setenv("TART_STANDIN_GUEST_IGNORES_STOP", "1")
    runtime.start("dave")
    stopped = runtime.stop("dave", timeout=1)
    assert tart.calls()[-2:] == [["<SIGUSR2>", "dave"], ["stop", "dave", "--timeout", "10"]]
    assert stopped.state == State.STOPPED
    assert tart.vms()["dave"]["State"] == "stopped"


def test_removing_a_version_deletes_its_installed_vm(tart: Tart) -> None:
    version = land_version(tart.store)
    runtime = TartRuntime(tart.store)
    runtime.create("erin", "workspace-arm64")  # installs the image VM, then clones it
    result = subprocess.run(
        [sys.executable, "-m", "rockpool", "image", "rm", version.ref, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert tart.calls()[-1] == ["delete", IMAGE_VM]
    assert set(tart.vms()) == {"erin"}  # the workspace, a full clone, stays
    assert runtime.uninstall_image(version) is False

"""The runtime registry: the CLI's --runtime offers exactly its runtimes, the default
comes from it, and image rm and image gc ask every runtime it has, so a new runtime is
one module plus one registry line (FakeRuntime below is registered in one line)."""

from __future__ import annotations

import argparse
import builtins
import json
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import ClassVar

import pytest

from rockpool import cli
from rockpool import runtime as runtimes
from rockpool.errors import Damaged, ExitCode, InvalidInput
from rockpool.runtime.base import Endpoint, Holdings, Runtime, Workspace
from rockpool.runtime.incus import IncusRuntime
from rockpool.runtime.qemu import QemuRuntime
from rockpool.runtime.tart import TartRuntime
from rockpool.store import Store, Version
from tests.small_image import land_small_image

FAKE = "tests.unit.test_runtimes:FakeRuntime"


class FakeRuntime(Runtime):
    """A runtime whose one workspace, fake-ws, holds what the test says."""

    name = "fake"
    title = "Fake"
    default_image = "small"
    installs_images = True
    holds: ClassVar[list[Path]] = []
    unreadable: ClassVar[list[str]] = []
    uninstalled: ClassVar[list[str]] = []
    usable: ClassVar[bool] = True

    def available(self) -> bool:
        return self.usable

    def install_image(self, version: Version) -> str:
        return f"fake-{version.id}"

    def uninstall_image(self, version: Version) -> bool:
        self.uninstalled.append(version.ref)
        return True

    def holdings(self) -> Holdings:
        held = Holdings(hint="ask the fake")
        for path in self.holds:
            held.files[path] = ["fake-ws"]
        held.unreadable += self.unreadable
        return held

    def remove_unused(self) -> builtins.list[Path]:
        return [self.store.root / "fake-layer"]

    # The workspace verbs: not what these tests are about.
    def create(self, name: str, image_ref: str) -> Workspace:
        raise NotImplementedError

    def start(
        self, name: str, env: Mapping[str, str] | None = None, authorized_keys: str | None = None
    ) -> Workspace:
        raise NotImplementedError

    def stop(self, name: str, timeout: float = 90.0, suspend: bool = False) -> Workspace:
        raise NotImplementedError

    def status(self, name: str) -> Workspace:
        raise NotImplementedError

    def endpoint(self, name: str) -> Endpoint:
        raise NotImplementedError

    def clone(self, source: str, new_name: str) -> Workspace:
        raise NotImplementedError

    def remove(self, name: str, force: bool = False) -> None:
        raise NotImplementedError

    def damaged(self) -> builtins.list[Damaged]:
        return []

    def list(self) -> builtins.list[Workspace]:
        return []


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[type[FakeRuntime]]:
    monkeypatch.setitem(runtimes.RUNTIMES, "fake", FAKE)  # the one registry line
    monkeypatch.setattr(FakeRuntime, "holds", [])
    monkeypatch.setattr(FakeRuntime, "unreadable", [])
    monkeypatch.setattr(FakeRuntime, "uninstalled", [])
    monkeypatch.setattr(FakeRuntime, "usable", True)
    monkeypatch.setenv("ROCKPOOL_HOME", str(tmp_path / "store"))
    handlers = {s: signal.getsignal(s) for s in cli.STOP_SIGNALS}  # cli.main sets them
    yield FakeRuntime
    for stop_signal, handler in handlers.items():
        signal.signal(stop_signal, handler)


def rockpool(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["-q", *args])
    out, err = capsys.readouterr()
    return code, out, err


def runtime_choices(parser: argparse.ArgumentParser) -> dict[str, list[str] | None]:
    """The choices of every --runtime option, by the command line that leads to it."""
    found: dict[str, list[str] | None] = {}

    def walk(node: argparse.ArgumentParser, path: str) -> None:
        for action in node._actions:
            if isinstance(action, argparse._SubParsersAction):
                for verb, child in action.choices.items():
                    walk(child, f"{path} {verb}".strip())
            elif "--runtime" in action.option_strings:
                found[path] = list(action.choices) if action.choices else None

    walk(parser, "")
    return found


def test_the_clis_runtimes_are_the_registrys(fake: type[FakeRuntime]) -> None:
    choices = runtime_choices(cli.build_parser())
    install = choices.pop("image install")
    assert install == list(runtimes.installers()) == ["tart", "incus", "fake"]
    workspace_verbs = {path for path in choices if path.startswith("workspace ")}
    assert workspace_verbs == set(choices) and len(workspace_verbs) == 14
    assert all(choice == list(runtimes.names()) for choice in choices.values())
    assert runtimes.names() == ("qemu", "tart", "incus", "fake")


def test_the_registry_makes_each_runtime_and_knows_its_default_image(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    assert runtimes.names() == ("qemu", "tart", "incus")
    assert type(runtimes.get("qemu", store)) is QemuRuntime
    assert type(runtimes.get("tart", store)) is TartRuntime
    assert type(runtimes.get("incus", store)) is IncusRuntime
    assert runtimes.get("tart", store).store is store
    assert QemuRuntime.default_image == "workspace"
    assert TartRuntime.default_image == "workspace-arm64"
    assert runtimes.installers() == ("tart", "incus")
    with pytest.raises(InvalidInput, match="no runtime named 'vmware'") as caught:
        runtimes.get("vmware", store)
    assert caught.value.hint == "the runtimes are: qemu, tart, incus"


def test_runtime_options_go_only_to_the_runtime_that_has_them(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    incus = runtimes.get("incus", store, remote="cluster", project="team-a", target="m2")
    assert isinstance(incus, IncusRuntime)
    assert (incus.incus.remote, incus.incus.project, incus.target) == ("cluster", "team-a", "m2")
    assert incus.incus.ref("alice") == "cluster:alice"
    with pytest.raises(InvalidInput, match="--target does not apply to the qemu runtime") as caught:
        runtimes.get("qemu", store, target="m2", remote=None)
    assert caught.value.hint == "it is for --runtime incus"
    # incus's own command line takes them: nothing that reads as an option
    for bad in ("-x", "--all", "a b", "a/b"):
        with pytest.raises(InvalidInput, match="is not a name"):
            runtimes.get("incus", store, remote=bad)
    with pytest.raises(InvalidInput, match="'vm' or 'container'"):
        runtimes.get("incus", store, instance_type="lxc")


def test_the_default_runtime(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ROCKPOOL_RUNTIME", raising=False)
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert runtimes.default_name() == "tart"
    assert type(runtimes.get(None, Store(tmp_path))) is TartRuntime
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    assert runtimes.default_name() == "qemu"
    monkeypatch.setenv("ROCKPOOL_RUNTIME", "tart")
    assert runtimes.default_name() == "tart"


def test_an_unknown_rockpool_runtime_is_exit_2_naming_the_runtimes(tmp_path: Path) -> None:
    env = {**os.environ, "ROCKPOOL_HOME": str(tmp_path), "ROCKPOOL_RUNTIME": "vmware"}
    for verb in (["ls"], ["create", "alice"], ["port", "ls", "alice"]):
        result = subprocess.run(
            [sys.executable, "-m", "rockpool", "workspace", *verb],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == int(ExitCode.INVALID_INPUT) == 2, result.stderr
        assert "ROCKPOOL_RUNTIME must be one of qemu, tart, incus, not 'vmware'" in result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1


def test_a_registered_runtime_is_offered_and_named(
    fake: type[FakeRuntime], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ROCKPOOL_RUNTIME", "vmware")
    code, _, err = rockpool(capsys, "workspace", "ls")
    assert code == 2 and "must be one of qemu, tart, incus, fake, not 'vmware'" in err
    monkeypatch.setenv("ROCKPOOL_RUNTIME", "fake")
    code, out, _ = rockpool(capsys, "workspace", "ls", "--json")
    assert (code, json.loads(out)) == (0, [])
    version = land_small_image(Store.default())
    code, out, _ = rockpool(capsys, "image", "install", "small", "--runtime", "fake", "--json")
    assert code == 0
    installed = f"fake-{version.id}"
    assert json.loads(out) == {
        "image": version.ref,
        "runtime": "fake",
        "installed": installed,
        "vm": installed,
    }


def test_rm_and_gc_ask_every_registered_runtime(
    fake: type[FakeRuntime], capsys: pytest.CaptureFixture[str]
) -> None:
    store = Store.default()
    old, new = land_small_image(store), land_small_image(store)
    fake.holds = [old.path / "disk.qcow2"]

    code, _, err = rockpool(capsys, "image", "rm", old.ref)
    assert code == 6 and f"{old.ref} is in use by workspaces: fake-ws" in err
    code, out, _ = rockpool(capsys, "image", "gc", "--json")
    collected = json.loads(out)
    assert code == 0 and collected["removed"] == []
    assert {"image": old.ref, "latest": False, "held_by": ["fake-ws"]} in collected["kept"]
    assert collected["removed_layers"] == [str(store.root / "fake-layer")]
    assert old.path.is_dir() and fake.uninstalled == []

    # Holding a version's directory as a whole holds it too.
    fake.holds = [old.path]
    code, _, err = rockpool(capsys, "image", "rm", old.ref)
    assert code == 6 and "fake-ws" in err

    # What it cannot read blocks every deletion, with the runtime's own hint.
    fake.holds, fake.unreadable = [], ["broken-ws"]
    code, _, err = rockpool(capsys, "image", "rm", old.ref)
    assert code == 6 and "built on: broken-ws" in err and "ask the fake" in err
    code, out, _ = rockpool(capsys, "image", "gc", "--json")
    collected = json.loads(out)
    assert collected["removed"] == [] and collected["removed_layers"] == []
    assert any(w.endswith("; nothing was removed") for w in collected["warnings"])

    # Held by nothing: gone, and the runtime uninstalls it once the lock is released.
    fake.unreadable = []
    code, out, _ = rockpool(capsys, "image", "gc", "--json")
    assert code == 0 and json.loads(out)["removed"] == [old.ref]
    assert not old.path.exists() and fake.uninstalled == [old.ref]
    code, out, _ = rockpool(capsys, "image", "rm", new.ref, "--json")
    assert code == 0 and json.loads(out) == {"removed": new.ref}
    assert fake.uninstalled == [old.ref, new.ref]


def test_a_runtime_this_host_cannot_run_is_not_asked(
    fake: type[FakeRuntime], capsys: pytest.CaptureFixture[str]
) -> None:
    """As Tart on Linux: no `tart`, so neither gc nor rm may fail for the want of it."""
    store = Store.default()
    old, _ = land_small_image(store), land_small_image(store)
    fake.holds, fake.usable = [old.path / "disk.qcow2"], False
    asked = [runtime.name for runtime in runtimes.available(store)]
    assert "qemu" in asked and "fake" not in asked
    code, out, _ = rockpool(capsys, "image", "gc", "--json")
    assert code == 0 and json.loads(out)["removed"] == [old.ref]
    assert fake.uninstalled == []


def test_the_cli_asks_the_registry_for_runtimes() -> None:
    source = Path(cli.__file__).read_text(encoding="utf-8")
    imported = {line.split()[1] for line in source.splitlines() if line.startswith("from ")}
    assert not {"rockpool.runtime.qemu", "rockpool.runtime.tart"} & imported
    assert "QemuRuntime" not in source and "TartRuntime" not in source

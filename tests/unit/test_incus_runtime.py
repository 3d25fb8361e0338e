"""The Incus runtime's own logic, without a server: what it reads from Incus's answers
and how Incus's errors become the project's (tests/e2e/test_incus.py runs it against
real daemons)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from rockpool.errors import CommandFailed, Conflict, MissingTool, NotFound
from rockpool.runtime.incus import _is_ours, _listen_port, _proxy, aliases
from rockpool.store import Store
from rockpool.tools.incus import split_fingerprint, translate
from tests.small_image import land_small_image


def test_the_fingerprint_is_incus_s_for_a_split_image(tmp_path: Path) -> None:
    metadata, root = tmp_path / "meta.tar", tmp_path / "rootfs.squashfs"
    metadata.write_bytes(b"m" * 3000)
    root.write_bytes(bytes(range(256)) * 9000)
    expected = hashlib.sha256(metadata.read_bytes() + root.read_bytes()).hexdigest()
    assert split_fingerprint(metadata, root) == expected


def test_a_proxy_device_round_trips_its_listen_port() -> None:
    device = _proxy("127.0.0.1", 41234, 8080)
    assert device == {
        "type": "proxy",
        "bind": "host",
        "listen": "tcp:127.0.0.1:41234",
        "connect": "tcp:127.0.0.1:8080",
    }
    assert _listen_port(device) == 41234
    assert _listen_port({"type": "disk", "source": "/x"}) is None
    assert _listen_port({"type": "proxy", "listen": "unix:/run/x.sock"}) is None
    assert _listen_port(None) is None


def test_aliases_name_the_version_and_latest_per_type(tmp_path: Path) -> None:
    version = land_small_image(Store(tmp_path / "store"))
    container, vm = aliases(version, "container"), aliases(version, "virtual-machine")
    assert container == [f"small/{version.id}", "small/latest"]
    assert vm == [f"small/{version.id}/vm", "small/latest/vm"]


def test_which_instances_are_workspaces() -> None:
    assert _is_ours({"name": "a", "config": {"user.rockpool.image": "w:0123456789ab"}})
    assert not _is_ours({"name": "b", "config": {"image.os": "debian"}})
    # Incus cannot read the config of an instance on a member that is down.
    assert _is_ours({"name": "c", "config": None})


def failed(stderr: str) -> CommandFailed:
    return CommandFailed(["incus", "init"], 1, stderr)


def test_incus_errors_become_the_projects() -> None:
    no_vms = translate(
        failed(
            "Error: Failed instance creation: Instance type virtual-machine is not supported "
            "on this server: vhost_vsock kernel module not loaded"
        ),
        "creating workspace 'v'",
    )
    assert isinstance(no_vms, MissingTool)
    assert "vhost_vsock kernel module not loaded" in str(no_vms)
    assert "KVM" in (no_vms.hint or "") and "vhost_vsock" in (no_vms.hint or "")
    assert isinstance(translate(failed('Error: Image "x" not found'), "x"), NotFound)
    assert isinstance(translate(failed("Error: Instance already exists"), "x"), Conflict)
    other = failed("Error: something else")
    assert translate(other, "x") is other


def test_the_instance_type_flag_is_vm_or_container(tmp_path: Path) -> None:
    from rockpool.errors import InvalidInput
    from rockpool.runtime.incus import IncusRuntime

    assert IncusRuntime(Store(tmp_path), instance_type="vm").instance_type == "virtual-machine"
    assert IncusRuntime(Store(tmp_path), instance_type="container").instance_type == "container"
    with pytest.raises(InvalidInput):
        IncusRuntime(Store(tmp_path), instance_type="kvm")

"""QEMU runner pieces that need no VM: firmware lookup and the accelerator choice."""

from __future__ import annotations

import pytest

from rockpool.errors import MissingTool
from rockpool.runtime import qemu


def test_missing_firmware_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(qemu.FIRMWARE, "amd64", [("/nonexistent/CODE.fd", "/nonexistent/VARS.fd")])
    with pytest.raises(MissingTool, match="UEFI firmware") as caught:
        qemu.find_firmware("amd64")
    assert caught.value.hint is not None and "ovmf" in caught.value.hint


def test_accelerator_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    qemu.kvm_usable.cache_clear()
    monkeypatch.setenv("ROCKPOOL_ACCEL", "tcg")
    assert qemu.accelerator_args("amd64")[:2] == ["-accel", "tcg,thread=multi"]
    qemu.kvm_usable.cache_clear()


def test_port_forwards_bind_loopback_only(tmp_path: object) -> None:
    from pathlib import Path

    config = qemu.VMConfig(
        name="t",
        arch="amd64",
        disk=Path("/d.qcow2"),
        disk_format="qcow2",
        run_dir=Path(str(tmp_path)),
        forwards={8080: 12345, 22: 12346},
    )
    netdev = next(a for a in qemu.QemuVM(config).argv() if a.startswith("user,"))
    assert "hostfwd=tcp:127.0.0.1:12345-:8080" in netdev
    assert "hostfwd=tcp:127.0.0.1:12346-:22" in netdev
    assert "hostfwd=tcp::" not in netdev

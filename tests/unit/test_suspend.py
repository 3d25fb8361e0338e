"""When a saved state may be resumed: every reason to boot cold instead."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest

from rockpool.runtime import suspend
from rockpool.tools import kvm
from rockpool.tools.qemu import QemuVM, VMConfig

MACHINE: dict[str, Any] = {
    "qemu": {"path": "/usr/bin/qemu-system-x86_64", "sha256": "a" * 64},
    "firmware_sha256": "b" * 64,
    "machine": ["-machine", "q35", "-m", "4096"],
}
BOOT = suspend.boot_inputs({"ROCKPOOL_WORKSPACE_NAME": "nap"}, "ssh-ed25519 AAAA key\n")


@pytest.fixture
def saved(tmp_path: Path) -> dict[str, Path]:
    disks = {name: tmp_path / name for name in ("disk.qcow2", "nvram.fd")}
    for path in disks.values():
        path.write_bytes(b"disk")
    suspend.partial(tmp_path).write_bytes(os.urandom(4096))
    assert suspend.interrupted(tmp_path) and not suspend.is_suspended(tmp_path)
    suspend.commit(tmp_path, MACHINE, disks, BOOT, "small:0123456789ab")
    assert suspend.is_suspended(tmp_path) and not suspend.interrupted(tmp_path)
    return disks


def reason(workspace: Path, disks: dict[str, Path], **changes: Any) -> str | None:
    machine = copy.deepcopy(MACHINE)
    machine.update(changes.pop("machine", {}))
    return suspend.stale_reason(workspace, machine, disks, changes.get("boot", BOOT))


def test_an_unchanged_workspace_resumes(tmp_path: Path, saved: dict[str, Path]) -> None:
    assert reason(tmp_path, saved) is None
    state = suspend.directory(tmp_path) / suspend.STATE
    assert state.stat().st_mode & 0o777 == 0o600
    assert suspend.directory(tmp_path).stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"qemu": {"path": "/usr/bin/qemu-system-x86_64", "sha256": "c" * 64}}, "QEMU binary"),
        ({"firmware_sha256": "d" * 64}, "firmware"),
        ({"machine": ["-machine", "pc-q35-10.0", "-m", "4096"]}, "machine changed"),
    ],
)
def test_another_qemu_or_machine_boots_cold(
    tmp_path: Path, saved: dict[str, Path], change: dict[str, Any], expected: str
) -> None:
    found = reason(tmp_path, saved, machine=change)
    assert found is not None and expected in found


def test_a_touched_disk_boots_cold(tmp_path: Path, saved: dict[str, Path]) -> None:
    with open(saved["disk.qcow2"], "ab") as disk:
        disk.write(b"x")
    assert reason(tmp_path, saved) == "disk.qcow2 was changed since the suspend"


def test_a_replaced_disk_fits_again_once_refreshed(tmp_path: Path, saved: dict[str, Path]) -> None:
    replacement = tmp_path / "new-top"
    replacement.write_bytes(b"disk")
    os.replace(replacement, saved["disk.qcow2"])
    assert reason(tmp_path, saved) == "disk.qcow2 was changed since the suspend"
    suspend.refresh_disk(tmp_path, "disk.qcow2", saved["disk.qcow2"])
    assert reason(tmp_path, saved) is None


def test_other_values_or_keys_boot_cold(tmp_path: Path, saved: dict[str, Path]) -> None:
    other_env = suspend.boot_inputs(
        {"ROCKPOOL_WORKSPACE_NAME": "nap", "ROCKPOOL_TEAM": "x"}, "ssh-ed25519 AAAA key\n"
    )
    other_keys = suspend.boot_inputs({"ROCKPOOL_WORKSPACE_NAME": "nap"}, None)
    for boot in (other_env, other_keys):
        found = reason(tmp_path, saved, boot=boot)
        assert found is not None and "ROCKPOOL_*" in found


def test_a_truncated_or_damaged_state_boots_cold(tmp_path: Path, saved: dict[str, Path]) -> None:
    state = suspend.directory(tmp_path) / suspend.STATE
    data = state.read_bytes()
    state.write_bytes(data[:-1])
    assert reason(tmp_path, saved) == "the state file is incomplete or damaged"
    state.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    assert reason(tmp_path, saved) == "the state file is incomplete or damaged"
    state.unlink()
    assert reason(tmp_path, saved) == "the state file is missing"


def test_a_damaged_record_boots_cold(tmp_path: Path, saved: dict[str, Path]) -> None:
    (suspend.directory(tmp_path) / suspend.SAVED).write_text("{not json")
    assert reason(tmp_path, saved) == "the saved state's record is damaged"
    suspend.discard(tmp_path)
    assert not suspend.directory(tmp_path).exists() and not suspend.is_suspended(tmp_path)


def test_a_host_reboot_leaves_the_machine_as_it_was(tmp_path: Path) -> None:
    """What a reboot changes for a QEMU workspace (the run directory and its sockets, the
    accelerator verdict made again, other free ports) is no part of the saved machine;
    another accelerator is."""

    def machine(run: str, port: int, run_as: str | None, verdict: kvm.Verdict) -> Any:
        config = VMConfig(
            name="nap",
            arch="amd64",
            disk=tmp_path / "disk.qcow2",
            disk_format="qcow2",
            run_dir=tmp_path,
            config_disk=tmp_path / "config.img",
            mac="52:54:00:12:34:56",
            forwards={8080: port, 22: port + 1},
            qmp_socket=tmp_path / run / "nap.qmp",
            run_as=run_as,
        )
        return QemuVM(config).fingerprint(verdict)

    before = machine("run-1", 41000, None, kvm.Verdict("tcg", "probed", boot_id="boot-1"))
    after = machine("run-2", 41010, "nobody", kvm.Verdict("tcg", "probed again", boot_id="2"))
    assert before == after
    assert before != machine("run-2", 41010, None, kvm.Verdict("kvm", "works now"))

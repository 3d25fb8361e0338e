"""QEMU runner pieces that need no VM: firmware lookup, the accelerator choice and the
watch over a KVM guest's first seconds."""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rockpool import tools
from rockpool.errors import InvalidInput, MissingTool
from rockpool.tools import kvm, qemu


@pytest.fixture(autouse=True)
def private_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setattr(kvm, "run_directory", lambda: run)
    monkeypatch.delenv(kvm.ACCEL_VARIABLE, raising=False)
    return run


def test_missing_firmware_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        tools.FIRMWARE_FILES, "amd64", [("/nonexistent/CODE.fd", "/nonexistent/VARS.fd")]
    )
    with pytest.raises(MissingTool, match="UEFI firmware") as caught:
        qemu.find_firmware("amd64")
    assert caught.value.hint is not None and "ovmf" in caught.value.hint


def test_accelerator_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kvm.ACCEL_VARIABLE, "tcg")
    verdict = kvm.choose("amd64")
    assert not verdict.kvm and "ROCKPOOL_ACCEL" in verdict.reason
    assert qemu.accelerator_args("amd64", verdict)[:2] == ["-accel", "tcg,thread=multi"]
    monkeypatch.setenv(kvm.ACCEL_VARIABLE, "KVM ")
    assert kvm.choose("amd64").kvm
    monkeypatch.setenv(kvm.ACCEL_VARIABLE, "hvf")
    with pytest.raises(InvalidInput, match="ROCKPOOL_ACCEL must be kvm, tcg or auto"):
        kvm.choose("amd64")


def test_a_foreign_guest_never_gets_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvm, "host_architecture", lambda: "amd64")
    verdict = kvm.choose("arm64")
    assert verdict.accelerator == "tcg" and "arm64 guest on an amd64 host" in verdict.reason


def test_a_verdict_holds_for_this_boot_and_this_qemu_only(
    monkeypatch: pytest.MonkeyPatch, private_run_directory: Path
) -> None:
    probes: list[str] = []

    def probe(binary: str, arch: str, firmware: kvm.Firmware) -> tuple[bool, str]:
        probes.append(arch)
        return False, "the guest stopped under KVM in QEMU run state internal-error"

    monkeypatch.setattr(kvm, "probe", probe)
    monkeypatch.setattr(kvm, "kvm_device_problem", lambda: None)
    monkeypatch.setattr(kvm, "host_architecture", lambda: "amd64")
    monkeypatch.setattr(
        "rockpool.tools.kvm.shutil.which", lambda program, path=None: sys.executable
    )
    monkeypatch.setattr(kvm, "find_firmware", lambda arch: kvm.Firmware(Path("c"), Path("v")))
    boot = ["boot-1"]
    monkeypatch.setattr(kvm, "boot_id", lambda: boot[0])

    first = kvm.choose("amd64")
    assert not first.kvm and "internal-error" in first.reason
    assert kvm.choose("amd64") == first and probes == ["amd64"]  # cached
    saved = json.loads((private_run_directory / "accel-amd64.json").read_text())
    assert saved["accelerator"] == "tcg" and saved["boot_id"] == "boot-1"
    boot[0] = "boot-2"  # the host rebooted: probe again
    kvm.choose("amd64")
    assert probes == ["amd64", "amd64"]
    # A KVM guest that failed at start overrides the probe's verdict for this boot.
    kvm.remember("amd64", "tcg", "a KVM guest failed at start")
    assert kvm.choose("amd64").reason == "a KVM guest failed at start"


class FakeQmp:
    """A QMP peer on a unix socket that reports one run state, as a QEMU whose guest
    hit a KVM internal error does (a protocol stand-in: no guest runs)."""

    def __init__(self, path: Path, state: str) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen()
        self.state = state
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                self._converse(conn)

    def _converse(self, conn: socket.socket) -> None:
        greeting = {
            "QMP": {
                "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                "capabilities": [],
            }
        }
        conn.sendall(json.dumps(greeting).encode() + b"\n")
        decoder, pending = json.JSONDecoder(), ""
        while chunk := conn.recv(4096):
            pending += chunk.decode()
            # QMP is a stream of JSON objects, not of lines.
            while pending.strip():
                try:
                    request, end = decoder.raw_decode(pending.lstrip())
                except ValueError:
                    break
                pending = pending.lstrip()[end:]
                result = (
                    {"status": self.state, "running": self.state == "running"}
                    if request["execute"] == "query-status"
                    else {}
                )
                reply = {"return": result, **({"id": request["id"]} if "id" in request else {})}
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    return

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def fake_qmp(tmp_path: Path) -> Iterator[FakeQmp]:
    peer = FakeQmp(tmp_path / "qmp.sock", "internal-error")
    yield peer
    peer.close()


def test_watch_reports_a_guest_stuck_in_internal_error(tmp_path: Path, fake_qmp: FakeQmp) -> None:
    works, reason = kvm.watch_start(
        lambda: None, tmp_path / "qmp.sock", tmp_path / "console", 10, lambda: ""
    )
    assert not works and "internal-error" in reason


def test_watch_accepts_a_guest_whose_firmware_printed(tmp_path: Path, fake_qmp: FakeQmp) -> None:
    fake_qmp.state = "running"
    (tmp_path / "console").write_text("BdsDxe: loading Boot0001\n")
    works, reason = kvm.watch_start(
        lambda: None, tmp_path / "qmp.sock", tmp_path / "console", 10, lambda: ""
    )
    assert works and "printed" in reason


def test_watch_reports_qemu_exiting_and_silence(tmp_path: Path, fake_qmp: FakeQmp) -> None:
    works, reason = kvm.watch_start(
        lambda: 134, tmp_path / "none.sock", tmp_path / "console", 10, lambda: "MSR 0x10a"
    )
    assert not works and "status 134" in reason and "MSR 0x10a" in reason
    fake_qmp.state = "running"
    works, reason = kvm.watch_start(
        lambda: None, tmp_path / "qmp.sock", tmp_path / "console", 0.5, lambda: ""
    )
    assert not works and "printed nothing" in reason


def test_port_forwards_bind_loopback_only(tmp_path: Path) -> None:
    config = qemu.VMConfig(
        name="t",
        arch="amd64",
        disk=Path("/d.qcow2"),
        disk_format="qcow2",
        run_dir=tmp_path,
        forwards={8080: 12345, 22: 12346},
    )
    verdict = kvm.Verdict("tcg", "test")
    netdev = next(a for a in qemu.QemuVM(config).argv(verdict) if a.startswith("user,"))
    assert "hostfwd=tcp:127.0.0.1:12345-:8080" in netdev
    assert "hostfwd=tcp:127.0.0.1:12346-:22" in netdev
    assert "hostfwd=tcp::" not in netdev


def test_a_guest_kernel_panic_on_the_console_is_found(tmp_path: Path) -> None:
    from rockpool.tools.qemu import PANIC_WINDOW, kernel_panic

    console = tmp_path / "console.log"
    assert kernel_panic(console) is None  # no console yet
    console.write_text("x" * (PANIC_WINDOW * 3) + "\n[    2.1] Booting\n")
    assert kernel_panic(console) is None
    with open(console, "a") as handle:
        handle.write(
            "[    2.109282] Kernel panic - not syncing: Fatal exception in interrupt\n"
            "[    4.042659] ---[ end Kernel panic - not syncing: Fatal exception ]---\n"
        )
    found = kernel_panic(console)
    assert found is not None and found.endswith("Fatal exception in interrupt")

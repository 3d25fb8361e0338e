"""Workspaces on QEMU: a qcow2 overlay per workspace over an immutable image version.

    STORE/workspaces/NAME/workspace.json   name, image version, created, clone source
    STORE/workspaces/NAME/disk.qcow2       the persistent disk (overlay)
    STORE/workspaces/NAME/{nvram.fd,config.img,qemu.pid,qmp.sock,console.log}
    STORE/layers/ID.qcow2                  frozen layers shared by a clone and its source

State is never stored: it is read from the QEMU process (pid file checked against
/proc) every time, so a crash cannot leave a stale "running".
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rockpool.command import run
from rockpool.errors import Conflict
from rockpool.names import check_slug
from rockpool.runtime.base import (
    RECORD,
    Endpoint,
    Runtime,
    State,
    Workspace,
    locked_workspace,
    read_record,
    record_names,
    utc_now,
    workspace_dir,
    write_config_disk,
)
from rockpool.runtime.qemu import QemuVM, VMConfig, create_overlay, free_port, random_mac
from rockpool.store import Store, write_json_atomic

log = logging.getLogger("rockpool.workspaces")
MIB = 1 << 20


class QemuRuntime(Runtime):
    name = "qemu"

    def __init__(self, store: Store) -> None:
        self.store = store
        self.root = store.root / "workspaces"
        self.layers = store.root / "layers"

    # ---- records and locks --------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        return workspace_dir(self.root, name)

    def _record(self, name: str) -> dict[str, Any]:
        return read_record(self.root, name)

    def _locked(self, name: str) -> contextlib.AbstractContextManager[Path]:
        return locked_workspace(self.root, name)

    def _vm(self, name: str, record: dict[str, Any] | None = None) -> QemuVM:
        record = record or self._record(name)
        directory = self._dir(name)
        forwards = {int(k): v for k, v in record.get("forwards", {}).items()}
        return QemuVM(
            VMConfig(
                name=name,
                arch=record["architecture"],
                disk=directory / "disk.qcow2",
                disk_format="qcow2",
                run_dir=directory,
                carrier=directory / "config.img",
                cpus=record["cpus"],
                memory_mib=record["memory_mib"],
                mac=record["mac"],
                forwards=forwards,
            )
        )

    def _workspace(self, name: str, record: dict[str, Any]) -> Workspace:
        vm = self._vm(name, record)
        running = vm.alive()
        endpoint = None
        if running and record.get("forwards"):
            endpoint = Endpoint(
                "127.0.0.1", record["forwards"]["8080"], record["forwards"].get("22")
            )
        return Workspace(
            name=name,
            runtime=self.name,
            image=record["image"],
            state=State.RUNNING if running else State.STOPPED,
            created=record["created"],
            cloned_from=record.get("cloned_from"),
            endpoint=endpoint,
            details={
                "disk": str(vm.config.disk),
                "pid": vm.pid,
                "console_log": str(vm.console_log),
                "accelerator": record.get("accelerator"),
            },
        )

    # ---- the interface ------------------------------------------------------------------

    def create(self, name: str, image_ref: str) -> Workspace:
        check_slug(name, "workspace name")
        version = self.store.resolve(image_ref)
        base = version.output_path("qcow2")
        if self._dir(name).exists():
            raise Conflict(f"a workspace named '{name}' exists already")
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = version.manifest
        record = {
            "name": name,
            "runtime": self.name,
            "image": version.ref,
            "image_disk": str(base),
            "architecture": manifest["architecture"],
            "user": manifest.get("user", "coder"),
            "cpus": manifest.get("spec", {}).get("cpus", 2),
            "memory_mib": manifest.get("spec", {}).get("memory", 4 << 30) // MIB,
            "mac": random_mac(),
            "instance_id": uuid.uuid4().hex,
            "created": utc_now(),
        }
        with self._new_directory(name) as directory:
            # A qcow2 overlay: the same O(1) cost for a 1 GB or a 20 GB image.
            create_overlay(base, "qcow2", directory / "disk.qcow2")
            write_json_atomic(directory / RECORD, record)
        return self._workspace(name, record)

    @contextlib.contextmanager
    def _new_directory(self, name: str) -> Iterator[Path]:
        """Build a workspace aside and rename it into place: all or nothing, and of two
        concurrent creates of one name exactly one wins."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".new-{name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            yield staging
            try:
                os.rename(staging, self._dir(name))
            except OSError:
                raise Conflict(f"a workspace named '{name}' exists already") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def start(
        self, name: str, env: Mapping[str, str] | None = None, authorized_keys: str | None = None
    ) -> Workspace:
        with self._locked(name) as directory:
            record = self._record(name)
            vm = self._vm(name, record)
            if vm.alive():
                log.info("workspace %s is running already", name)
                return self._workspace(name, record)
            write_config_disk(directory, name, record["instance_id"], env, authorized_keys)
            record["forwards"] = {"8080": free_port(), "22": free_port()}
            write_json_atomic(directory / RECORD, record)
            verdict = self._vm(name, record).start()
            record["accelerator"] = {"name": verdict.accelerator, "reason": verdict.reason}
            write_json_atomic(directory / RECORD, record)
            return self._workspace(name, record)

    def stop(self, name: str, timeout: float = 90.0) -> Workspace:
        with self._locked(name):
            record = self._record(name)
            vm = self._vm(name, record)
            if vm.alive():
                graceful = vm.stop(timeout)
                log.info("stopped %s (%s)", name, "ACPI power-off" if graceful else "killed")
            return self._workspace(name, record)

    def status(self, name: str) -> Workspace:
        return self._workspace(name, self._record(name))

    def endpoint(self, name: str) -> Endpoint:
        workspace = self.status(name)
        if workspace.endpoint is None:
            raise Conflict(
                f"workspace '{name}' is not running",
                hint=f"start it with: rockpool workspace start {name}",
            )
        return workspace.endpoint

    def clone(self, source: str, new_name: str) -> Workspace:
        check_slug(new_name, "workspace name")
        if self._dir(new_name).exists():
            raise Conflict(f"a workspace named '{new_name}' exists already")
        with self._locked(source) as source_dir:
            record = self._record(source)
            if self._vm(source, record).alive():
                raise Conflict(
                    f"workspace '{source}' is running; a clone of a running disk would not "
                    "be consistent",
                    hint=f"stop it first: rockpool workspace stop {source}",
                )
            self.layers.mkdir(parents=True, exist_ok=True)
            layer = self.layers / f"{uuid.uuid4().hex}.qcow2"
            disk = source_dir / "disk.qcow2"
            # Freeze the source's disk as a shared layer; both get a fresh overlay on it.
            # Until the final renames, the source still uses its own disk unchanged.
            os.link(disk, layer)
            layer.chmod(0o444)
            new_top = source_dir / "disk.qcow2.new"
            create_overlay(layer, "qcow2", new_top)
            clone_record = {
                **record,
                "name": new_name,
                "mac": random_mac(),
                "instance_id": uuid.uuid4().hex,
                "cloned_from": source,
                "created": utc_now(),
            }
            clone_record.pop("forwards", None)
            with self._new_directory(new_name) as directory:
                create_overlay(layer, "qcow2", directory / "disk.qcow2")
                write_json_atomic(directory / RECORD, clone_record)
                if (source_dir / "authorized_keys").is_file():
                    shutil.copyfile(source_dir / "authorized_keys", directory / "authorized_keys")
            # The source moves onto the shared layer only once the clone exists.
            os.replace(new_top, disk)
        return self._workspace(new_name, clone_record)

    def remove(self, name: str, force: bool = False) -> None:
        with self._locked(name) as directory:
            vm = self._vm(name)
            if vm.alive():
                if not force:
                    raise Conflict(
                        f"workspace '{name}' is running",
                        hint=f"stop it first, or: rockpool workspace rm --force {name}",
                    )
                vm.kill()
            trash = self.root / f".removed-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(directory, trash)  # gone from view at once; deleted below
        shutil.rmtree(trash, ignore_errors=True)
        self.remove_unused_layers()

    def list(self) -> list[Workspace]:
        return [self.status(name) for name in record_names(self.root)]

    # ---- what workspaces hold -----------------------------------------------------------

    def backing_files(self, disk: Path) -> builtins.list[Path]:
        """Every file below disk in its qcow2 backing chain (layers, then the image)."""
        info = run(
            ["qemu-img", "info", "--backing-chain", "-U", "--output=json", disk], capture=True
        ).stdout
        chain = json.loads(info)
        return [Path(entry["filename"]) for entry in chain[1:]]

    def holders(self) -> dict[Path, builtins.list[str]]:
        """File -> the workspaces whose disks depend on it."""
        held: dict[Path, builtins.list[str]] = {}
        for workspace in self.list():
            for path in self.backing_files(self._dir(workspace.name) / "disk.qcow2"):
                held.setdefault(path.resolve(), []).append(workspace.name)
        return held

    def remove_unused_layers(self) -> builtins.list[Path]:
        if not self.layers.is_dir():
            return []
        held = self.holders()
        removed = []
        for layer in self.layers.glob("*.qcow2"):
            if layer.resolve() not in held:
                layer.unlink()
                removed.append(layer)
        return removed

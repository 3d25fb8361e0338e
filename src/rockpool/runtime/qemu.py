"""Workspaces on QEMU: a qcow2 overlay per workspace over an immutable image version.

    STORE/workspaces/NAME/workspace.json   name, image version, created, clone source
    STORE/workspaces/NAME/disk.qcow2       the persistent disk (overlay)
    STORE/workspaces/NAME/{nvram.fd,config.img,qemu.pid,console.log}
    STORE/layers/ID.qcow2                  frozen layers shared by a clone and its source
    RUN/ws-STORE/NAME.qmp                  QMP socket, under the short run directory

State is never stored: it comes from QEMU itself (pid file checked against /proc, then
QMP query-status) every time, so a crash or a guest stuck in an internal error cannot
pass for "running".

Locks: each workspace's own lock orders start, stop, clone and remove of it; creating
and cloning hold the store's lock shared, removing layers holds it exclusive (store.py).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rockpool.errors import CommandFailed, Conflict, Damaged, InvalidInput, NotFound
from rockpool.files import copy_private, move_aside, remove_tree, write_json_atomic
from rockpool.names import check_slug, is_mac
from rockpool.rundir import run_directory
from rockpool.runtime import network
from rockpool.runtime import suspend as suspend_state
from rockpool.runtime.base import (
    RECORD,
    Endpoint,
    Holdings,
    PortForward,
    Runtime,
    State,
    Workspace,
    boot_values,
    check_timeout,
    locked_workspace,
    read_record,
    readable_records,
    record_names,
    utc_now,
    workspace_dir,
    write_boot_values,
)
from rockpool.store import Store, Version
from rockpool.tools import guest_agent, kvm, qmp
from rockpool.tools.qemu import QemuProcess, QemuVM, VMConfig, VMState, random_mac
from rockpool.tools.qemu_img import backing_files, create_overlay

log = logging.getLogger("rockpool.workspaces")
MIB = 1 << 20
DISK = "disk.qcow2"
NEW_TOP = "disk.qcow2.new"  # a clone's next top layer for the source, until it switches
GUEST_PORTS = ("8080", "22")
DYNAMIC_PORTS_LIMIT = 64
RESUME_TIMEOUT = 300.0  # loading a saved state: about 3 s for 4 GiB of guest RAM under TCG
SUSPEND_TIMEOUT = 300.0  # saving one, at least
START_ATTEMPTS = 3  # a forward's port taken between the pick and QEMU's bind: pick again
UNREADABLE_HINT = (
    "check them with: qemu-img info --backing-chain STORE/workspaces/NAME/disk.qcow2; "
    "remove a broken one with: rockpool workspace rm --force NAME"
)


def _is_guest_port(port: object) -> bool:
    return isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535


def check_guest_port(port: int) -> int:
    if not _is_guest_port(port):
        raise InvalidInput(f"a guest port is a number from 1 to 65535, not {port!r}")
    if str(port) in GUEST_PORTS:
        raise Conflict(
            f"guest port {port} is forwarded already: it is the workspace's "
            + ("code-server" if port == 8080 else "SSH")
        )
    return port


class QemuRuntime(Runtime):
    name = "qemu"
    title = "QEMU"
    default_image = "workspace"

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.root = store.root / "workspaces"
        self.layers = store.root / "layers"

    # ---- records, locks and paths -------------------------------------------------------

    def _dir(self, name: str) -> Path:
        return workspace_dir(self.root, name)

    def _check(self, record: dict[str, Any]) -> str | None:
        """The QEMU record's own fields, as create wrote them."""
        if record.get("architecture") not in ("amd64", "arm64"):
            return f"architecture {record.get('architecture')!r} is unknown"
        for key, low, high in (("cpus", 1, 1024), ("memory_mib", 64, 16 << 20)):
            value = record.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                return f"{key} {value!r} is not a number from {low} to {high}"
        if not is_mac(record.get("mac")):
            return f"mac {record.get('mac')!r} is no MAC address"
        ports = record.get("ports", [])
        if not (
            isinstance(ports, list)
            and len(ports) <= DYNAMIC_PORTS_LIMIT
            and all(_is_guest_port(port) and str(port) not in GUEST_PORTS for port in ports)
        ):
            return f"ports {ports!r} are not guest ports"
        forwards = record.get("forwards", {})
        guest_ports = {*GUEST_PORTS, *(str(port) for port in ports)}
        if not isinstance(forwards, dict) or not all(
            key in guest_ports and isinstance(port, int) and 1024 <= port <= 65535
            for key, port in forwards.items()
        ):
            return f"forwards {forwards!r} are not host ports of the workspace's guest ports"
        if record.get("network", "open") not in ("open", "isolated"):
            return f"network {record.get('network')!r} is neither isolated nor open"
        return None

    def _record(self, name: str) -> dict[str, Any]:
        return read_record(self.root, name, self._check)

    def _locked(
        self, name: str, *, damaged_ok: bool = False
    ) -> contextlib.AbstractContextManager[Path]:
        return locked_workspace(self.root, name, damaged_ok=damaged_ok)

    def _socket(self, name: str) -> Path:
        """A short path for NAME's QMP socket, whatever the store's path: one directory
        per store under the run directory."""
        store_key = hashlib.sha256(str(self.store.root.absolute()).encode()).hexdigest()[:8]
        return run_directory() / f"ws-{store_key}" / f"{name}.qmp"

    def _process(self, name: str) -> QemuProcess:
        return QemuProcess(self._dir(name), self._socket(name))

    def _vm(
        self, name: str, record: dict[str, Any], isolation: network.Isolation | None = None
    ) -> QemuVM:
        directory = self._dir(name)
        forwards = {int(k): v for k, v in record.get("forwards", {}).items()}
        return QemuVM(
            VMConfig(
                name=name,
                arch=record["architecture"],
                disk=directory / DISK,
                disk_format="qcow2",
                run_dir=directory,
                config_disk=directory / "config.img",
                cpus=record["cpus"],
                memory_mib=record["memory_mib"],
                mac=record["mac"],
                forwards=forwards,
                qmp_socket=self._socket(name),
                run_as=isolation.user if isolation else None,
            )
        )

    def _workspace(self, name: str, record: dict[str, Any], vm_state: VMState) -> Workspace:
        state = State(vm_state.state)
        if state is State.STOPPED and suspend_state.is_suspended(self._dir(name)):
            state = State.SUSPENDED
        endpoint = None
        forwards = record.get("forwards", {})
        if state is State.RUNNING and "8080" in forwards:
            endpoint = Endpoint(
                "127.0.0.1",
                forwards["8080"],
                forwards.get("22"),
                ports={int(k): v for k, v in forwards.items() if k not in GUEST_PORTS},
                network=record.get("network", "open"),
            )
        process = self._process(name)
        return Workspace(
            name=name,
            runtime=self.name,
            image=record["image"],
            state=state,
            created=record["created"],
            cloned_from=record.get("cloned_from"),
            endpoint=endpoint,
            details={
                "disk": str(self._dir(name) / DISK),
                "pid": vm_state.pid,
                "qemu_status": vm_state.qemu_status,
                "reason": vm_state.reason,
                "console_log": str(process.console_log),
                "accelerator": record.get("accelerator"),
                "last_start": record.get("last_start"),
            },
        )

    @contextlib.contextmanager
    def _new_directory(self, name: str) -> Iterator[Path]:
        """Build a workspace aside and rename it into place: all or nothing, and of two
        concurrent creates of one name exactly one wins."""
        self.store.ensure_root()
        self.root.mkdir(exist_ok=True)
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

    # ---- the interface ------------------------------------------------------------------

    def create(self, name: str, image_ref: str) -> Workspace:
        check_slug(name, "workspace name")
        if self._dir(name).exists():
            raise Conflict(f"a workspace named '{name}' exists already")
        # Shared: image rm and gc wait until the overlay and its record exist.
        with self.store.locked(exclusive=False):
            version = self.store.resolve(image_ref)
            base = version.output_path("qcow2")
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
            problem = self._check(record)
            if problem:
                raise Damaged(
                    f"{version.ref}'s manifest gives a workspace that cannot run: {problem}",
                    hint=f"rebuild the image, or remove it: rockpool image rm {version.ref}",
                )
            with self._new_directory(name) as directory:
                # A qcow2 overlay: the same O(1) cost for a 1 GB or a 20 GB image.
                create_overlay(base, "qcow2", directory / DISK)
                write_json_atomic(directory / RECORD, record)
        return self._workspace(name, record, VMState("stopped"))

    def start(
        self, name: str, env: Mapping[str, str] | None = None, authorized_keys: str | None = None
    ) -> Workspace:
        with self._locked(name) as directory:
            record = self._record(name)
            vm = self._vm(name, record)
            current = vm.state()
            if current.state == "paused" and suspend_state.interrupted(directory):
                log.info("a suspend of %s was interrupted; its paused VM goes", name)
                vm.kill()
            elif current.state in ("running", "paused"):
                log.info("workspace %s is %s already", name, current.state)
                return self._workspace(name, record, current)
            if current.state == "failed":
                log.info("workspace %s had failed (%s); starting it again", name, current.reason)
                vm.kill()
            values = boot_values(directory, name, record["instance_id"], env, authorized_keys)
            variables, keys, _ = values
            boot = suspend_state.boot_inputs(variables, keys)
            isolation = network.isolate()
            record["network"] = "isolated" if isolation else "open"
            fallback = None
            if suspend_state.is_suspended(directory):
                resumed, fallback = self._resume(name, directory, record, isolation, boot)
                if resumed is not None:
                    return self._workspace(name, record, resumed.state())
            suspend_state.discard(directory)  # stale, or left by an interrupted suspend
            write_boot_values(directory, *values)
            record["boot_inputs"] = boot
            record["last_start"] = {"resumed": False, "reason": fallback}
            vm = self._launch(name, directory, record, isolation)
            return self._workspace(name, record, vm.state())

    def _disks(self, directory: Path) -> dict[str, Path]:
        """The files a saved state's guest has open, besides its RAM."""
        return {name: directory / name for name in (DISK, "nvram.fd", "config.img")}

    def _resume(
        self,
        name: str,
        directory: Path,
        record: dict[str, Any],
        isolation: network.Isolation | None,
        boot: str,
    ) -> tuple[QemuVM | None, str | None]:
        """Resume NAME from its saved state: the running VM, or None and why the start
        boots cold instead. The state goes either way: it is used once."""
        verdict = kvm.choose(record["architecture"])
        machine = self._vm(name, record).fingerprint(verdict)
        reason = suspend_state.stale_reason(directory, machine, self._disks(directory), boot)
        if reason is None:
            state = suspend_state.directory(directory) / suspend_state.STATE
            try:
                vm = self._launch(name, directory, record, isolation, resume=(state, verdict))
            except CommandFailed as exc:
                reason = f"QEMU could not resume the saved state: {exc.stderr_tail.strip()[-300:]}"
            else:
                suspend_state.discard(directory)
                record["last_start"] = {"resumed": True, "reason": None, "clock": _set_clock(vm)}
                write_json_atomic(directory / RECORD, record)
                log.info("resumed %s from its saved state", name)
                return vm, None
        log.warning("%s boots cold: %s", name, reason)
        return None, reason

    def _launch(
        self,
        name: str,
        directory: Path,
        record: dict[str, Any],
        isolation: network.Isolation | None,
        resume: tuple[Path, kvm.Verdict] | None = None,
    ) -> QemuVM:
        """Start QEMU with a forward for each guest port; a port another process took
        between the pick and QEMU's bind is picked again."""
        guest_ports = [*GUEST_PORTS, *(str(port) for port in record.get("ports", []))]
        previous = record.get("forwards", {})
        refused: set[int] = set()
        for attempt in range(1, START_ATTEMPTS + 1):
            forwards: dict[str, int] = {}
            for guest in guest_ports:
                taken = refused | set(forwards.values())
                forwards[guest] = network.pick_port(taken, previous.get(guest))
            record["forwards"] = forwards
            write_json_atomic(directory / RECORD, record)
            vm = self._vm(name, record, isolation)
            try:
                if resume is None:
                    verdict = vm.start()
                else:
                    state, verdict = resume
                    vm.resume(state, verdict, RESUME_TIMEOUT)
            except CommandFailed as exc:
                if "host forwarding" not in exc.stderr_tail or attempt == START_ATTEMPTS:
                    raise
                log.info("a forward's port of %s was taken; picking ports again", name)
                refused |= set(forwards.values())
                previous = {}
                continue
            record["accelerator"] = {"name": verdict.accelerator, "reason": verdict.reason}
            write_json_atomic(directory / RECORD, record)
            return vm
        raise AssertionError("unreachable")

    def stop(self, name: str, timeout: float = 90.0, suspend: bool = False) -> Workspace:
        check_timeout(timeout)
        with self._locked(name) as directory:
            record = self._record(name)
            vm = self._vm(name, record)
            current = vm.state().state
            if suspend and current in ("paused", "failed"):
                # Its guest does not run: what could be saved is not a guest to resume.
                raise Conflict(
                    f"workspace '{name}' is {current}: there is no running guest to suspend",
                    hint=f"power it off: rockpool workspace stop {name}",
                )
            if suspend and current == "running":
                self._suspend(name, directory, record, vm, timeout)
            elif vm.alive():
                graceful = vm.stop(timeout)
                log.info("stopped %s (%s)", name, "ACPI power-off" if graceful else "killed")
            if not suspend:
                suspend_state.discard(directory)  # powered off: a saved state is stale
            return self._workspace(name, record, vm.state())

    def _suspend(
        self, name: str, directory: Path, record: dict[str, Any], vm: QemuVM, timeout: float
    ) -> None:
        """Save the running guest's state and quit its QEMU. If saving fails, the guest
        carries on running and nothing is kept."""
        suspend_state.discard(directory)
        partial = suspend_state.partial(directory)
        running_on = record.get("accelerator") or {}
        if "name" in running_on:
            verdict = kvm.Verdict(running_on["name"], str(running_on.get("reason", "")))
        else:
            verdict = kvm.choose(record["architecture"])
        machine = vm.fingerprint(verdict)
        try:
            vm.save_state(partial, max(timeout, SUSPEND_TIMEOUT))
        except (CommandFailed, qmp.QmpUnavailable):
            suspend_state.discard(directory)
            with contextlib.suppress(qmp.QmpUnavailable):
                vm.qmp("cont")
            raise
        with contextlib.suppress(qmp.QmpUnavailable):  # QEMU may exit before it answers
            vm.qmp("quit")
        if not vm.wait_exit(30):
            vm.kill()
        state = suspend_state.commit(
            directory, machine, self._disks(directory), record.get("boot_inputs"), record["image"]
        )
        log.info("suspended %s: %d MiB of state", name, state.stat().st_size >> 20)

    # ---- dynamic ports ------------------------------------------------------------------

    def _port_forwards(self, record: dict[str, Any], running: bool) -> builtins.list[PortForward]:
        forwards = record.get("forwards", {}) if running else {}
        return [
            PortForward(port, "127.0.0.1" if running else None, forwards.get(str(port)))
            for port in sorted(record.get("ports", []))
        ]

    def ports(self, name: str) -> builtins.list[PortForward]:
        record = self._record(name)
        return self._port_forwards(record, self._vm(name, record).alive())

    def add_port(self, name: str, guest_port: int) -> PortForward:
        guest_port = check_guest_port(guest_port)
        with self._locked(name) as directory:
            record = self._record(name)
            ports = record.setdefault("ports", [])
            if guest_port not in ports:
                if len(ports) >= DYNAMIC_PORTS_LIMIT:
                    raise Conflict(
                        f"workspace '{name}' has {DYNAMIC_PORTS_LIMIT} ports already",
                        hint=f"remove one first: rockpool workspace port rm {name} PORT",
                    )
                ports.append(guest_port)
            vm = self._vm(name, record)
            forwards = record.setdefault("forwards", {})
            if vm.alive() and str(guest_port) not in forwards:
                host_port = network.pick_port(forwards.values())
                vm.add_forward(host_port, guest_port)
                forwards[str(guest_port)] = host_port
            write_json_atomic(directory / RECORD, record)
            return next(
                p for p in self._port_forwards(record, vm.alive()) if p.guest_port == guest_port
            )

    def remove_port(self, name: str, guest_port: int) -> None:
        guest_port = check_guest_port(guest_port)
        with self._locked(name) as directory:
            record = self._record(name)
            if guest_port not in record.get("ports", []):
                raise NotFound(
                    f"workspace '{name}' has no port {guest_port}",
                    hint=f"list them with: rockpool workspace port ls {name}",
                )
            vm = self._vm(name, record)
            host_port = record.get("forwards", {}).pop(str(guest_port), None)
            if host_port is not None and vm.alive():
                vm.remove_forward(host_port)
            record["ports"].remove(guest_port)
            write_json_atomic(directory / RECORD, record)

    def status(self, name: str) -> Workspace:
        record = self._record(name)
        return self._workspace(name, record, self._vm(name, record).state())

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
        with self._locked(source) as source_dir, self.store.locked(exclusive=False):
            record = self._record(source)
            if self._vm(source, record).alive():
                raise Conflict(
                    f"workspace '{source}' is running; a clone of a running disk would not "
                    "be consistent",
                    hint=f"stop it first: rockpool workspace stop {source}",
                )
            self.layers.mkdir(parents=True, exist_ok=True)
            layer = self.layers / f"{uuid.uuid4().hex}.qcow2"
            disk = source_dir / DISK
            new_top = source_dir / NEW_TOP
            clone_record = {
                **record,
                "name": new_name,
                "mac": random_mac(),
                "instance_id": uuid.uuid4().hex,
                "cloned_from": source,
                "created": utc_now(),
            }
            clone_record.pop("forwards", None)
            clone_record.pop("accelerator", None)
            # Freeze the source's disk as a shared layer, each side a new overlay on it.
            # The source switches to its overlay before the clone appears: at no point
            # can a disk that is still written be another one's backing file.
            os.link(disk, layer)
            create_overlay(layer, "qcow2", new_top)
            with self._new_directory(new_name) as directory:
                create_overlay(layer, "qcow2", directory / DISK)
                write_json_atomic(directory / RECORD, clone_record)
                if (source_dir / "authorized_keys").is_file():
                    copy_private(source_dir / "authorized_keys", directory / "authorized_keys")
                os.replace(new_top, disk)
                layer.chmod(0o444)
                if suspend_state.is_suspended(source_dir):
                    # Its disk reads the same through the new top layer: the saved
                    # state still fits it. The clone gets the disk only.
                    suspend_state.refresh_disk(source_dir, DISK, disk)
        return self._workspace(new_name, clone_record, VMState("stopped"))

    def remove(self, name: str, force: bool = False) -> None:
        with self._locked(name, damaged_ok=force) as directory:
            try:
                record = self._record(name)
            except Damaged:
                if not force:
                    raise
                record = None  # force: a damaged record goes too
            process = self._vm(name, record) if record else self._process(name)
            if process.alive():
                if not force:
                    raise Conflict(
                        f"workspace '{name}' is running",
                        hint=f"stop it first, or: rockpool workspace rm --force {name}",
                    )
                process.kill()
            trash = move_aside(directory)  # gone from view at once; deleted below
        process.remove_sockets()
        remove_tree(trash)
        self.remove_unused_layers()

    def list(self) -> builtins.list[Workspace]:
        records, _ = readable_records(self.root, self._check)
        return [
            self._workspace(name, record, self._vm(name, record).state())
            for name, record in records.items()
        ]

    def damaged(self) -> builtins.list[Damaged]:
        """What is wrong with each workspace whose record cannot be trusted."""
        return readable_records(self.root, self._check)[1]

    # ---- images and what workspaces hold ------------------------------------------------

    def install_image(self, version: Version) -> str:
        """Nothing to install: workspaces are overlays on the version's qcow2 itself.
        Returns that disk's path."""
        return str(version.output_path("qcow2"))

    def holdings(self) -> Holdings:
        """File -> the workspaces whose disks depend on it; damaged records included, for
        their disks still hold what they are built on."""
        held = Holdings(hint=UNREADABLE_HINT)
        for name in record_names(self.root):
            disk = self._dir(name) / DISK
            if not disk.exists():
                continue
            try:
                chain = backing_files(disk)
            except (CommandFailed, ValueError, KeyError, TypeError):
                held.unreadable.append(name)
                continue
            for path in chain:
                held.files.setdefault(path.resolve(), []).append(name)
        return held

    def remove_unused(self) -> builtins.list[Path]:
        return self.remove_unused_layers()

    def remove_unused_layers(self) -> builtins.list[Path]:
        """Delete the layers no workspace is built on, and what interrupted creates,
        clones and removes left; under the store's exclusive lock, so none is under way."""
        with self.store.locked(exclusive=True):
            self._sweep()
            if not self.layers.is_dir():
                return []
            held = self.holdings()
            if held.unreadable:
                log.warning(
                    "not removing layers: the disks of %s cannot be read",
                    ", ".join(held.unreadable),
                )
                return []
            removed = []
            for layer in self.layers.glob("*.qcow2"):
                if not layer.is_symlink() and layer.resolve() not in held.files:
                    layer.unlink()
                    removed.append(layer)
            return removed

    def _sweep(self) -> None:
        """What an interrupted create, clone or remove left: never a live one's, for
        they hold the store's lock while they run."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name.startswith((".new-", ".removed-")) and not entry.is_symlink():
                log.info("removing %s, left by an interrupted operation", entry)
                shutil.rmtree(entry, ignore_errors=True)
        for name in record_names(self.root):
            leftover = self._dir(name) / NEW_TOP
            if leftover.exists() and not self._process(name).alive():
                leftover.unlink(missing_ok=True)


def _set_clock(vm: QemuVM) -> dict[str, Any]:
    """The resumed guest's clock, still at the moment of the suspend, set to the host's
    through its agent. A guest without one runs on with its clock behind: the record
    says so, and the resume stands."""
    try:
        offset = guest_agent.set_clock(vm.agent_socket)
    except guest_agent.AgentUnavailable as exc:
        log.warning("%s: the guest's clock was not set: %s", vm.config.name, exc)
        return {"set": False, "reason": str(exc)}
    log.info("%s: the guest's clock was %.1fs off; set", vm.config.name, offset)
    return {"set": True, "was_off_seconds": round(offset, 3)}

"""Workspaces on Tart (macOS on Apple silicon): one local Tart VM per workspace.

    $TART_HOME/vms/rockpool-IMAGE-VERSION/     an image version, installed once (install_image)
    $TART_HOME/vms/NAME/                       workspace NAME: a `tart clone` of that VM
    STORE/tart/workspaces/NAME/workspace.json  image NAME:VERSION, created, cloned_from,
                                               instance id
    STORE/tart/workspaces/NAME/{config.img,authorized_keys,tart-run.log}

Tart keeps the VMs, rockpool keeps which of them are workspaces: a Tart VM is a workspace
only if it has a record here. State is never stored: it comes from `tart list` (running
means a `tart run` process holds the lock on the VM's config.json), so a crash cannot
leave a stale "running". Every tart command goes through the client in tools/tart.py.

A clone is a new machine: its record gets a new ROCKPOOL_INSTANCE_ID, which start()
writes to the config disk. At boot, before systemd starts, the image's initramfs hook
(rockpool-identity, written by images/scripts/setup.sh) compares it with the id in
/var/lib/rockpool/instance-id on the root disk; when they differ it removes the SSH host
keys, systemd's random seed and D-Bus's machine-id, empties /etc/machine-id and records
the new id, so systemd makes a new machine-id and rockpool-hostkeys.service new host
keys. `tart clone` also gives the clone a new MAC address: its own DHCP lease and IP.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rockpool.command import STDERR_TAIL_LINES
from rockpool.errors import (
    CommandFailed,
    Conflict,
    Damaged,
    ExitCode,
    InvalidInput,
    NotFound,
    RockpoolError,
)
from rockpool.files import move_aside, remove_tree, write_json_atomic
from rockpool.names import check_slug
from rockpool.runtime import network
from rockpool.runtime.base import (
    AUTHORIZED_KEYS,
    RECORD,
    Endpoint,
    Holdings,
    Runtime,
    State,
    Workspace,
    locked_workspace,
    read_record,
    readable_records,
    utc_now,
    workspace_dir,
    write_config_disk,
)
from rockpool.store import Store, Version
from rockpool.tools import tart as tart_cli
from rockpool.tools.tart import CONFIG, DISK, RESERVED_PREFIX

log = logging.getLogger("rockpool.workspaces")

BUILD_HINT = (
    "build the arm64 spec images/workspace-arm64.toml, which writes the tart format: "
    "rockpool image build images/workspace-arm64.toml"
)
TART_OUTPUT = "tart"
RUN_LOG = "tart-run.log"
CODE_SERVER_PORT = 8080
SSH_PORT = 22
IP_POLL_SECONDS = 1  # `tart ip --wait` takes whole seconds
STATE_POLL_SECONDS = 0.25
STOP_GRACE_SECONDS = 10.0  # `tart stop`'s wait before it kills a VM that ignored the request


class TartVMError(RockpoolError):
    """Tart ran, but the VM is not usable: `tart run` died, or the guest has no IP yet."""

    exit_code = ExitCode.COMMAND_FAILED


def check_name(name: str) -> str:
    """A workspace's name is its Tart VM's name.

    The slug rule keeps out every name Tart would not read as a plain local VM: a '/'
    makes it a remote OCI name (HOST/NAMESPACE[:TAG|@DIGEST]) and `tart clone`/`rename`
    reject it for a new VM; '.', '..' and other path tricks cannot be slugs either.
    """
    check_slug(name, "workspace name")
    if name.startswith(RESERVED_PREFIX):
        raise InvalidInput(
            f"invalid workspace name '{name}': names starting with '{RESERVED_PREFIX}' are "
            "kept for the Tart VMs of installed images"
        )
    return name


def image_vm_name(version: Version) -> str:
    return tart_cli.image_vm_name(version.name, version.id)


def tart_bundle(version: Version) -> Path:
    """The version's tart output: a directory with Tart's config.json and disk.img."""
    architecture = version.manifest.get("architecture") or "an unknown architecture"
    if architecture != "arm64":
        raise InvalidInput(
            f"{version.ref} is built for {architecture}; Tart runs arm64 guests only",
            hint=BUILD_HINT,
        )
    if TART_OUTPUT not in version.manifest.get("outputs", {}):
        raise InvalidInput(f"{version.ref} has no tart output", hint=BUILD_HINT)
    bundle = version.output_path(TART_OUTPUT)
    missing = [f for f in (CONFIG, DISK) if not (bundle / f).is_file()]
    if missing:
        raise InvalidInput(
            f"the tart output of {version.ref} ({bundle}) lacks {' and '.join(missing)}",
            hint=BUILD_HINT,
        )
    return bundle


def _exit_status(pid: int) -> tuple[bool, int | None]:
    """(exited, exit status if known) of a child this process spawned."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        # Reaped already (subprocess reaps children it lost track of): see if it lives.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True, None
        except PermissionError:
            pass
        return False, None
    if done == 0:
        return False, None
    return True, os.waitstatus_to_exitcode(status)


def _tail(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-STDERR_TAIL_LINES:])


class TartRuntime(Runtime):
    name = "tart"
    title = "Tart"
    default_image = "workspace-arm64"  # Tart runs only arm64 guests
    installs_images = True

    def __init__(self, store: Store, *, ip_timeout: float = 120.0) -> None:
        super().__init__(store)
        self.root = store.root / "tart" / "workspaces"
        self.ip_timeout = ip_timeout  # how long start() waits for the guest's IP

    # ---- images ---------------------------------------------------------------------------

    def install_image(self, version: Version) -> str:
        """Make an image version a local Tart VM; returns its name, rockpool-IMAGE-VERSION.

        Idempotent; see tools.tart.install_bundle for how (a genuine nvram.bin from
        `tart create --linux`, the image's disk and config, one rename when whole).
        """
        bundle = tart_bundle(version)
        vm = image_vm_name(version)
        if tart_cli.install_bundle(bundle, vm):
            log.info("installed %s as the Tart VM %s", version.ref, vm)
        return vm

    def uninstall_image(self, version: Version) -> bool:
        """Delete the version's installed Tart VM, if there is one. Workspaces are full
        clones of it (APFS copy-on-write), so none depends on it. Only arm64 versions
        can have one."""
        if version.manifest.get("architecture") != "arm64":
            return False
        vm = image_vm_name(version)
        if not tart_cli.uninstall(vm):
            return False
        log.info("deleted the Tart VM %s of %s", vm, version.ref)
        return True

    def available(self) -> bool:
        return tart_cli.available()

    def holdings(self) -> Holdings:
        """Nothing: an installed image VM is a copy of the version's disk, and each
        workspace a full (copy-on-write) clone of it."""
        return Holdings()

    # ---- records --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _claimed(self, name: str) -> Iterator[Path]:
        """Claim a new workspace's directory before its Tart VM exists, holding its lock.

        `tart clone` silently replaces a VM that has the new name, so of two concurrent
        creates of one name exactly one may get as far as cloning. The directory appears
        with its lock already held; if the body fails, it is removed again.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        directory = workspace_dir(self.root, name)
        self._remove_stale_claim(directory)
        staging = self.root / f".new-{name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        with open(staging / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                os.rename(staging, directory)  # fails if it exists (it holds a .lock)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                raise Conflict(f"a workspace named '{name}' exists already") from None
            try:
                yield directory
            except BaseException:
                shutil.rmtree(directory, ignore_errors=True)
                raise

    @staticmethod
    def _remove_stale_claim(directory: Path) -> None:
        """A directory with no record whose lock nobody holds: its create was killed."""
        if not directory.is_dir() or (directory / RECORD).exists():
            return
        with open(directory / ".lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # a create is under way
            if not (directory / RECORD).exists():  # that create may have just finished
                shutil.rmtree(directory, ignore_errors=True)

    def _workspace(
        self,
        name: str,
        record: Mapping[str, Any],
        entry: Mapping[str, Any] | None,
        address: str | None = None,
    ) -> Workspace:
        running = tart_cli.is_running(entry)
        if running and address is None:
            try:
                address = tart_cli.vm_ip(name)
            except CommandFailed as exc:  # one VM's trouble must not hide the others
                log.warning("tart ip %s failed: %s", name, exc)
        endpoint = (
            Endpoint(address, CODE_SERVER_PORT, SSH_PORT, network=record.get("network", "open"))
            if address
            else None
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
                "tart_vm": name,
                "tart_state": entry.get("State") if entry is not None else "missing",
                "image_vm": record.get("image_vm"),
                "ip": address,
                "run_log": str(workspace_dir(self.root, name) / RUN_LOG),
            },
        )

    def _existing_vm(self, name: str) -> dict[str, Any]:
        entry = tart_cli.local_vms().get(name)
        if entry is None:
            raise NotFound(
                f"workspace '{name}' has no Tart VM any more (deleted outside rockpool?)",
                hint=f"remove the workspace: rockpool workspace rm {name}",
            )
        return entry

    def _refuse_foreign_vm(self, name: str) -> None:
        if name in tart_cli.local_vms():
            raise Conflict(
                f"Tart has a VM named '{name}' that is not a rockpool workspace",
                hint=f"choose another name, or delete that VM: tart delete {name}",
            )

    # ---- the interface --------------------------------------------------------------------

    def create(self, name: str, image_ref: str) -> Workspace:
        check_name(name)
        version = self.store.resolve(image_ref)
        tart_bundle(version)
        with self._claimed(name) as directory:
            self._refuse_foreign_vm(name)
            image_vm = self.install_image(version)
            record: dict[str, Any] = {
                "name": name,
                "runtime": self.name,
                "image": version.ref,
                "image_vm": image_vm,
                "architecture": version.manifest["architecture"],
                "instance_id": uuid.uuid4().hex,
                "cloned_from": None,
                "created": utc_now(),
            }
            with self._deleted_on_failure(name):
                tart_cli.run_tart("clone", image_vm, name)  # APFS copy-on-write: O(1)
                write_json_atomic(directory / RECORD, record)
        return self._workspace(name, record, tart_cli.local_vms().get(name))

    @contextlib.contextmanager
    def _deleted_on_failure(self, vm: str) -> Iterator[None]:
        """A cloned VM becomes a workspace with its record; without one it goes again."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(RockpoolError):
                tart_cli.run_tart("delete", vm)
            raise

    def start(
        self, name: str, env: Mapping[str, str] | None = None, authorized_keys: str | None = None
    ) -> Workspace:
        """Boot the workspace and wait until the guest has an IP address (its DHCP lease).

        A running workspace is left as it is. Returns with the endpoint set; poll
        `GET {endpoint.url}healthz` for code-server's readiness.
        """
        with locked_workspace(self.root, name) as directory:
            record = read_record(self.root, name)
            entry = self._existing_vm(name)
            if tart_cli.is_running(entry):
                log.info("workspace %s is running already", name)
                return self._workspace(name, record, entry)
            config_disk = write_config_disk(
                directory, name, record["instance_id"], env, authorized_keys
            )
            run_log = directory / RUN_LOG
            offset = run_log.stat().st_size if run_log.exists() else 0
            # Softnet: the guest reaches the internet and the host's NAT gateway only, no
            # other VM and no private network (docs/security.md).
            isolated = network.mode() is network.Network.ISOLATED
            record["network"] = "softnet" if isolated else "open"
            write_json_atomic(directory / RECORD, record)
            pid = tart_cli.spawn_run(name, disk=config_disk, softnet=isolated, log_path=run_log)
            entry, address = self._wait_for_ip(name, pid, run_log, offset)
            return self._workspace(name, record, entry, address)

    def _wait_for_ip(
        self, name: str, pid: int, run_log: Path, offset: int
    ) -> tuple[dict[str, Any], str]:
        """Until `tart ip` answers. `tart run` dying, or the VM stopping, ends the wait."""
        deadline = time.monotonic() + self.ip_timeout
        seen_running = False
        while True:
            exited, status = _exit_status(pid)
            entry = tart_cli.local_vms().get(name)
            running = tart_cli.is_running(entry)
            if exited or (seen_running and not running):
                how = f" (exit status {status})" if status is not None else ""
                tail = _tail(run_log, offset)
                shown = "\n".join("    " + line for line in tail.splitlines())
                raise TartVMError(
                    f"workspace '{name}': `tart run` stopped right after it started{how}"
                    + (f"\n  last output:\n{shown}" if shown else ""),
                    hint=f"the whole log is {run_log}",
                )
            if running and entry is not None:
                seen_running = True
                # Only once the VM runs: a lease from its last run would answer at once.
                address = tart_cli.vm_ip(name, wait=IP_POLL_SECONDS)
                if address:
                    return entry, address
            if time.monotonic() >= deadline:
                raise self._no_ip(name, running)
            if not running:
                time.sleep(STATE_POLL_SECONDS)

    def _no_ip(self, name: str, running: bool = True) -> TartVMError:
        if not running:
            return TartVMError(
                f"workspace '{name}': `tart run` has not started the VM after "
                f"{self.ip_timeout:.0f} s",
                hint=f"see {workspace_dir(self.root, name) / RUN_LOG}",
            )
        return TartVMError(
            f"workspace '{name}' is running but has no IP address yet (`tart ip` finds "
            "no DHCP lease for its MAC address)",
            hint="the guest must send a MAC-based DHCP client id (Rockpool images do) for "
            f"tart ip to find it; retry: rockpool workspace status {name}",
        )

    def stop(self, name: str, timeout: float = 90.0, suspend: bool = False) -> Workspace:
        """Shut the guest down cleanly, then make sure.

        `tart stop` alone pulls the plug (SIGINT makes `tart run` call the Virtualization
        framework's stop()), losing what the guest has not written yet. So first the
        power button, as Tart does on SIGUSR2 (requestStop()); `tart stop` only if the
        guest is still up after timeout.
        """
        if suspend:
            raise self._no_suspend("Tart saves the state of macOS guests only")
        with locked_workspace(self.root, name):
            record = read_record(self.root, name)
            if tart_cli.is_running(tart_cli.local_vms().get(name)):
                if not self._request_guest_stop(name, timeout):
                    self._stop_vm(name, STOP_GRACE_SECONDS)
                log.info("stopped %s", name)
            return self._workspace(name, record, tart_cli.local_vms().get(name))

    def _request_guest_stop(self, name: str, timeout: float) -> bool:
        """SIGUSR2 to the `tart run` that holds the VM; True once the VM has stopped."""
        if not tart_cli.request_stop(name):
            return True
        deadline = time.monotonic() + timeout
        while tart_cli.run_lock_holder(tart_cli.vm_dir(name)) != 0:
            if time.monotonic() >= deadline:
                log.warning("%s did not power off within %.0f s; stopping it", name, timeout)
                return False
            time.sleep(STATE_POLL_SECONDS)
        return True

    def _stop_vm(self, name: str, timeout: float) -> None:
        with contextlib.suppress(tart_cli.NotRunning):  # it stopped by itself meanwhile
            tart_cli.run_tart("stop", name, "--timeout", str(math.ceil(max(timeout, 0.0))))

    def status(self, name: str) -> Workspace:
        record = read_record(self.root, name)
        return self._workspace(name, record, tart_cli.local_vms().get(name))

    def endpoint(self, name: str) -> Endpoint:
        workspace = self.status(name)
        if workspace.state != State.RUNNING:
            raise Conflict(
                f"workspace '{name}' is not running",
                hint=f"start it with: rockpool workspace start {name}",
            )
        if workspace.endpoint is None:
            raise self._no_ip(name)
        return workspace.endpoint

    def clone(self, source: str, new_name: str) -> Workspace:
        """`tart clone` (copy-on-write) plus a record with a new instance id: the clone
        makes its own SSH host keys and machine-id at its first boot."""
        check_name(new_name)
        with locked_workspace(self.root, source) as source_dir:
            record = read_record(self.root, source)
            if tart_cli.is_running(self._existing_vm(source)):
                raise Conflict(
                    f"workspace '{source}' is running; a clone of a running disk would not "
                    "be consistent",
                    hint=f"stop it first: rockpool workspace stop {source}",
                )
            with self._claimed(new_name) as directory:
                self._refuse_foreign_vm(new_name)
                clone_record = {
                    **record,
                    "name": new_name,
                    "instance_id": uuid.uuid4().hex,
                    "cloned_from": source,
                    "created": utc_now(),
                }
                with self._deleted_on_failure(new_name):
                    tart_cli.run_tart("clone", source, new_name)  # with a new MAC address
                    if (source_dir / AUTHORIZED_KEYS).is_file():
                        shutil.copyfile(source_dir / AUTHORIZED_KEYS, directory / AUTHORIZED_KEYS)
                    write_json_atomic(directory / RECORD, clone_record)
        return self._workspace(new_name, clone_record, tart_cli.local_vms().get(new_name))

    def remove(self, name: str, force: bool = False) -> None:
        with locked_workspace(self.root, name) as directory:
            entry = tart_cli.local_vms().get(name)
            if tart_cli.is_running(entry):
                if not force:
                    raise Conflict(
                        f"workspace '{name}' is running",
                        hint=f"stop it first, or: rockpool workspace rm --force {name}",
                    )
                self._stop_vm(name, 30.0)
            if entry is not None:
                with contextlib.suppress(NotFound):
                    tart_cli.run_tart("delete", name)
            trash = move_aside(directory)  # gone from view at once; deleted below
        remove_tree(trash)

    def list(self) -> builtins.list[Workspace]:
        vms = tart_cli.local_vms()
        records, _ = readable_records(self.root)
        return [self._workspace(name, record, vms.get(name)) for name, record in records.items()]

    def damaged(self) -> builtins.list[Damaged]:
        return readable_records(self.root)[1]

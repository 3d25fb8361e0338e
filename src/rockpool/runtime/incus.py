"""Incus: workspaces as Incus instances, system containers or VMs, on one server or a
cluster (docs/incus.md). Incus places them, copies them and keeps their disks; this
runtime keeps nothing of its own but the VMs' config disks.

Everything rockpool knows of a workspace is in its instance's config, so any worker
that reaches the server sees the same workspaces:
- user.rockpool.image (NAME:VERSION), .created, .cloned_from, .ports (dynamic ports);
- proxy devices rockpool-http (code-server), rockpool-ssh and rockpool-port-N, each
  listening on the member's 127.0.0.1 (ROCKPOOL_INCUS_LISTEN) on a port of the
  forward range, which the host's filter opens to the clients only (runtime/network.py).

The init contract: a container gets the config disk's two files, env and
authorized_keys, written into /etc/rockpool/carrier before each start (`incus file
push` works on a stopped container, on any member); a VM gets the config disk itself.
Its ROCKPOOL_INSTANCE_ID is Incus's volatile.uuid, which `incus copy` makes anew.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from rockpool.config_disk import render_env
from rockpool.errors import CommandFailed, Conflict, Damaged, InvalidInput, NotFound
from rockpool.formats.incus import METADATA, ROOTFS
from rockpool.names import check_slug, is_slug
from rockpool.runtime import network
from rockpool.runtime.base import (
    Endpoint,
    Holdings,
    PortForward,
    Runtime,
    Snapshot,
    State,
    Workspace,
    check_timeout,
    start_values,
    utc_now,
    write_config_disk,
)
from rockpool.store import Store, Version
from rockpool.tools.incus import Incus, split_fingerprint, translate

log = logging.getLogger("rockpool.runtime.incus")

IMAGE_KEY = "user.rockpool.image"
CREATED_KEY = "user.rockpool.created"
CLONED_FROM_KEY = "user.rockpool.cloned_from"
PORTS_KEY = "user.rockpool.ports"
VERSION_PROPERTY = "rockpool.version"
IMAGE_PROPERTY = "rockpool.image"
CARRIER = "/etc/rockpool/carrier"
GUEST_PORTS = {"rockpool-http": 8080, "rockpool-ssh": 22}
PORT_DEVICE = "rockpool-port-"
DYNAMIC_PORTS_LIMIT = 64
CONTAINER, VM = "container", "virtual-machine"
TYPES = {"container": CONTAINER, "vm": VM}
STATES = {
    "Running": State.RUNNING,
    "Stopped": State.STOPPED,
    "Frozen": State.PAUSED,
    "Error": State.FAILED,
}
# Remote, project and member names go onto incus's command line: no option look-alikes.
OPTION_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _option(value: str | None, what: str, variable: str | None = None) -> str | None:
    value = value if value is not None else (os.environ.get(variable) if variable else None)
    if value in (None, ""):
        return None
    assert value is not None
    if not OPTION_VALUE.fullmatch(value):
        source = f" ({variable})" if variable and value == os.environ.get(variable) else ""
        raise InvalidInput(
            f"the Incus {what}{source} '{value[:80]}' is not a name: use 1 to 63 letters, "
            "digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def aliases(version: Version, instance_type: str) -> list[str]:
    """NAME/VERSION and NAME/latest, with /vm for the VM image."""
    suffix = "/vm" if instance_type == VM else ""
    return [f"{version.name}/{version.id}{suffix}", f"{version.name}/latest{suffix}"]


class IncusRuntime(Runtime):
    name = "incus"
    title = "Incus"
    default_image = "workspace"
    installs_images = True
    options: ClassVar[tuple[str, ...]] = ("remote", "project", "target", "instance_type")

    def __init__(
        self,
        store: Store,
        remote: str | None = None,
        project: str | None = None,
        target: str | None = None,
        instance_type: str | None = None,
    ) -> None:
        super().__init__(store)
        self.incus = Incus(
            _option(remote, "remote", "ROCKPOOL_INCUS_REMOTE"),
            _option(project, "project", "ROCKPOOL_INCUS_PROJECT"),
        )
        self.target = _option(target, "cluster member")
        if instance_type is not None and instance_type not in TYPES:
            raise InvalidInput(
                f"the instance type is 'vm' or 'container', not '{instance_type}'",
            )
        self.instance_type = TYPES.get(instance_type or "")
        self.listen = os.environ.get("ROCKPOOL_INCUS_LISTEN", "127.0.0.1")
        # The VMs' config disks, by workspace; beside the locks, never one of them.
        self.configs = store.root / "incus" / "config-disks"

    def available(self) -> bool:
        return self.incus.reachable()

    # ---- images ---------------------------------------------------------------------------

    def _server_runs_vms(self) -> bool:
        server = self.incus.query("/1.0")
        drivers = str(server.get("environment", {}).get("driver", ""))
        return "qemu" in drivers.split(" | ")

    def _forms(self, version: Version) -> dict[str, tuple[Path, Path]]:
        """The image forms a version has: (metadata tarball, root) by instance type."""
        outputs = version.manifest.get("outputs", {})
        forms = {}
        if "incus-container" in outputs:
            directory = version.output_path("incus-container")
            forms[CONTAINER] = (directory / METADATA, directory / ROOTFS)
        if "incus" in outputs:
            forms[VM] = (version.output_path("incus"), version.output_path("qcow2"))
        if not forms:
            raise NotFound(
                f"{version.ref} has no Incus image (it has: {', '.join(outputs)})",
                hint='add "incus-container" (and "incus", "qcow2" for VMs) to image.formats '
                "and build again",
            )
        return forms

    def install_image(self, version: Version) -> str:
        """Import each Incus form of version that the server lacks (by fingerprint, so
        never twice) and point its aliases at it; returns the container image's
        fingerprint, else the VM's."""
        fingerprints = {}
        for instance_type, (metadata, root) in self._forms(version).items():
            fingerprint = split_fingerprint(metadata, root)
            if self.incus.image(fingerprint) is None:
                log.info("importing %s (%s) into Incus", version.ref, instance_type)
                self.incus.run("image", "import", metadata, root, self.incus.server)
            else:
                log.info("Incus has %s (%s) already: %s", version.ref, instance_type, fingerprint)
            # Which version it is: the version id cannot be in the metadata (it is the
            # digest of the outputs), and the same bytes may be landed under another name.
            for key, value in ((IMAGE_PROPERTY, version.name), (VERSION_PROPERTY, version.id)):
                self.incus.run("image", "set-property", self.incus.ref(fingerprint), key, value)
            for alias in aliases(version, instance_type):
                self._point_alias(alias, fingerprint)
            fingerprints[instance_type] = fingerprint
        return fingerprints.get(CONTAINER) or fingerprints[VM]

    def _point_alias(self, alias: str, fingerprint: str) -> None:
        try:
            self.incus.run("image", "alias", "create", self.incus.ref(alias), fingerprint)
        except CommandFailed as exc:
            if "already exists" not in exc.stderr_tail:
                raise
            # Replace it at once, no gap without the alias: the 'NAME/latest' of a newer build.
            target = {"target": fingerprint, "description": ""}
            path = f"/1.0/images/aliases/{urllib.parse.quote(alias, safe='')}"
            self.incus.query(path, method="PUT", data=target)

    def _installed(self, version: Version) -> list[dict[str, Any]]:
        return [
            image
            for image in self.incus.images()
            if image.get("properties", {}).get(VERSION_PROPERTY) == version.id
            and image.get("properties", {}).get(IMAGE_PROPERTY) == version.name
        ]

    def _base_images(self) -> set[str]:
        """The fingerprints instances were made from (Incus's volatile.base_image)."""
        return {
            str(_config(instance).get("volatile.base_image")) for instance in self.incus.instances()
        }

    def uninstall_image(self, version: Version) -> bool:
        """Delete the version's Incus images that no instance was made from; `image gc`
        deletes the others once their instances are gone (remove_unused)."""
        used = self._base_images()
        removed = False
        for image in self._installed(version):
            if image["fingerprint"] in used:
                log.info("keeping the Incus image of %s: instances use it", version.ref)
                continue
            self.incus.run("image", "delete", self.incus.ref(image["fingerprint"]))
            removed = True
        return removed

    def remove_unused(self) -> builtins.list[Path]:
        """Delete the Incus images rockpool imported whose version the store no longer
        has and no instance was made from. Nothing of the store: returns []."""
        used = self._base_images()
        for image in self.incus.images():
            properties = image.get("properties") or {}
            name, version_id = properties.get(IMAGE_PROPERTY), properties.get(VERSION_PROPERTY)
            if not (name and version_id) or image["fingerprint"] in used:
                continue
            try:
                self.store.version(str(name), str(version_id))
                continue  # still stored: uninstalled when it is removed
            except (NotFound, Damaged, InvalidInput):
                pass
            log.info("deleting the Incus image of %s:%s: nothing uses it", name, version_id)
            self.incus.run("image", "delete", self.incus.ref(image["fingerprint"]))
        return []

    def holdings(self) -> Holdings:
        """Nothing of the store: Incus keeps its own copy of each image it imported."""
        return Holdings()

    # ---- records: the instances' config -----------------------------------------------------

    def _instance(self, name: str) -> dict[str, Any]:
        check_slug(name, "workspace name")
        instance = self.incus.instance(name)
        if instance is None or not _is_ours(instance):
            raise NotFound(
                f"no workspace named '{name}' on {self.incus.server.rstrip(':')}",
                hint="list them with: rockpool workspace ls --runtime incus",
            )
        return instance

    def _ours(self) -> builtins.list[dict[str, Any]]:
        return [i for i in self.incus.instances() if _is_ours(i)]

    def _member_states(self) -> dict[str, str]:
        """Each cluster member's status (Online, Offline, Evacuated); {} when the server
        is no cluster."""
        if not self.incus.query("/1.0").get("environment", {}).get("server_clustered"):
            return {}
        members = self.incus.query("/1.0/cluster/members?recursion=1")
        return {str(m["server_name"]): str(m.get("status", "")) for m in members}

    def _workspace(
        self, instance: dict[str, Any], members: dict[str, str] | None = None
    ) -> Workspace:
        config = _config(instance)
        state = STATES.get(instance.get("status", ""), State.FAILED)
        location = instance.get("location") or None
        location = None if location == "none" else location
        member_status = (members or {}).get(location or "")
        reason = None
        if member_status and member_status != "Online":
            # Incus cannot ask an offline member; what it last knew is no state.
            state = State.FAILED
            reason = f"its cluster member {location} is {member_status.lower()}"
        elif state is State.FAILED:
            reason = f"Incus reports status {instance.get('status')!r}"
        devices = _devices(instance)
        listen = {device: _listen_port(devices.get(device)) for device in devices}
        endpoint = None
        http = listen.get("rockpool-http")
        if state is State.RUNNING and http:
            endpoint = Endpoint(
                self.listen,
                http,
                listen.get("rockpool-ssh"),
                ports={
                    int(device.removeprefix(PORT_DEVICE)): port
                    for device, port in listen.items()
                    if device.startswith(PORT_DEVICE) and port
                },
                network=config.get("user.rockpool.network", "open"),
            )
        return Workspace(
            name=instance["name"],
            runtime=self.name,
            image=config.get(IMAGE_KEY, "unknown"),
            state=state,
            created=config.get(CREATED_KEY, instance.get("created_at", "")),
            cloned_from=config.get(CLONED_FROM_KEY),
            endpoint=endpoint,
            details={
                "type": instance.get("type"),
                "member": location,
                "member_status": member_status,
                "reason": reason,
                "project": instance.get("project"),
                "incus_status": instance.get("status"),
                "remote": self.incus.remote or "local",
            },
        )

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """This host's starts, stops and clones of one workspace take turns."""
        self.store.ensure_root()
        locks = self.store.root / "incus" / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{check_slug(name, 'workspace name')}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # ---- the interface ----------------------------------------------------------------------

    def create(self, name: str, image_ref: str) -> Workspace:
        check_slug(name, "workspace name")
        if self.incus.instance(name) is not None:
            raise Conflict(f"an instance named '{name}' exists already on Incus")
        # Shared: image rm and gc wait until the image is imported.
        with self.store.locked(exclusive=False):
            version = self.store.resolve(image_ref)
            forms = self._forms(version)
            instance_type = self.instance_type or (
                VM if VM in forms and self._server_runs_vms() else CONTAINER
            )
            if instance_type not in forms:
                other = "vm" if instance_type == CONTAINER else "container"
                raise NotFound(
                    f"{version.ref} has no Incus {instance_type} image",
                    hint=f"create it as --type {other}, or add the format and build again",
                )
            self.install_image(version)
        spec = version.manifest.get("spec", {})
        config = {
            IMAGE_KEY: version.ref,
            CREATED_KEY: utc_now(),
            "limits.cpu": str(spec.get("cpus", 2)),
            "limits.memory": f"{int(spec.get('memory', 4 << 30)) >> 20}MiB",
            # Each tenant its own uid range: root in one container is nobody in another.
            "security.idmap.isolated": "true",
        }
        if instance_type == VM:
            config["security.secureboot"] = "false"  # systemd-boot is not signed
        argv: list[str] = ["init", self.incus.ref(aliases(version, instance_type)[0]), name]
        if instance_type == VM:
            argv.append("--vm")
        if self.target:
            argv += ["--target", self.target]
        for key, value in config.items():
            argv += ["--config", f"{key}={value}"]
        try:
            # One Incus operation: it makes the whole instance or none.
            self.incus.run(*argv)
        except CommandFailed as exc:
            raise translate(exc, f"creating workspace '{name}'") from None
        return self.status(name)

    def start(
        self, name: str, env: Mapping[str, str] | None = None, authorized_keys: str | None = None
    ) -> Workspace:
        with self._locked(name):
            instance = self._instance(name)
            if instance["status"] in ("Running", "Frozen"):
                log.info("workspace %s is %s already", name, instance["status"].lower())
                return self._workspace(instance)
            instance_id = _config(instance).get("volatile.uuid") or instance["name"]
            variables, keys = start_values(name, instance_id, env, authorized_keys)
            isolation = network.isolate()
            self._set_config(name, "user.rockpool.network", "isolated" if isolation else "open")
            self._place_ports(instance)
            if instance["type"] == CONTAINER:
                self._push_carrier(name, variables, keys)
            else:
                self._attach_config_disk(instance, instance_id, env, authorized_keys)
            try:
                self.incus.run("start", self.incus.ref(name))
            except CommandFailed as exc:
                raise translate(exc, f"starting workspace '{name}'") from None
            return self.status(name)

    def _set_config(self, name: str, key: str, value: str) -> None:
        self.incus.run("config", "set", self.incus.ref(name), f"{key}={value}")

    def _push_carrier(self, name: str, variables: dict[str, str], keys: str | None) -> None:
        """env and authorized_keys into the stopped container, root's only. Keys given
        once stay for later starts that give none."""
        files = {"env": render_env(variables)}
        if keys is not None:
            files["authorized_keys"] = keys
        with tempfile.TemporaryDirectory(prefix="rockpool-carrier-") as scratch:
            for file_name, content in files.items():
                local = Path(scratch) / file_name
                local.write_text(content)
                self.incus.run(
                    "file",
                    "push",
                    "--create-dirs",
                    "--uid",
                    "0",
                    "--gid",
                    "0",
                    "--mode",
                    "0600",
                    local,
                    self.incus.ref(f"{name}{CARRIER}/{file_name}"),
                )

    def _attach_config_disk(
        self,
        instance: dict[str, Any],
        instance_id: str,
        env: Mapping[str, str] | None,
        authorized_keys: str | None,
    ) -> None:
        name = instance["name"]
        directory = self.configs / name
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        disk = write_config_disk(directory, name, instance_id, env, authorized_keys)
        settings = {"type": "disk", "source": str(disk), "readonly": "true"}
        self._ensure_device(name, "rockpool-config", settings, _devices(instance))

    def _ensure_device(
        self, name: str, device: str, settings: dict[str, str], devices: dict[str, Any]
    ) -> None:
        """Device as settings, given the instance's devices as they are."""
        current = devices.get(device)
        if current == settings:
            return
        if current is not None:
            self.incus.run("config", "device", "remove", self.incus.ref(name), device)
        pairs = [f"{k}={v}" for k, v in settings.items() if k != "type"]
        self.incus.run(
            "config", "device", "add", self.incus.ref(name), device, settings["type"], *pairs
        )

    def _taken_ports(self, besides: str) -> set[int]:
        """The listen ports of every other workspace's proxy devices, running or not."""
        return {
            port
            for instance in self._ours()
            if instance["name"] != besides
            for device in _devices(instance).values()
            if (port := _listen_port(device))
        }

    def _place_ports(self, instance: dict[str, Any], keep: bool = True) -> None:
        """A proxy device for each guest port, on a port no other workspace has: the one
        it had where that is still free (routes stay right), else a new one."""
        name = instance["name"]
        devices = _devices(instance)
        wanted = dict(GUEST_PORTS)
        for guest in _dynamic_ports(instance):
            wanted[f"{PORT_DEVICE}{guest}"] = guest
        taken = self._taken_ports(name)
        running = instance["status"] != "Stopped"
        for device, guest in wanted.items():
            previous = _listen_port(devices.get(device)) if keep else None
            if running and previous is not None and previous not in taken:
                port = previous  # live already: its own proxy holds the port
            else:
                port = network.pick_port(taken, previous)
            taken.add(port)
            self._ensure_device(name, device, _proxy(self.listen, port, guest), devices)
        for device in devices:
            if device.startswith(PORT_DEVICE) and device not in wanted:
                self.incus.run("config", "device", "remove", self.incus.ref(name), device)

    def stop(self, name: str, timeout: float = 90.0, suspend: bool = False) -> Workspace:
        if suspend:
            raise self._no_suspend("rockpool does not drive `incus stop --stateful` yet")
        check_timeout(timeout)
        with self._locked(name):
            instance = self._instance(name)
            if instance["status"] != "Stopped":
                try:
                    self.incus.run(
                        "stop", self.incus.ref(name), "--timeout", str(max(1, round(timeout)))
                    )
                    log.info("stopped %s (shut down)", name)
                except CommandFailed:
                    self.incus.run("stop", self.incus.ref(name), "--force")
                    log.info("stopped %s (forced after %ss)", name, timeout)
            return self.status(name)

    def status(self, name: str) -> Workspace:
        return self._workspace(self._instance(name), self._member_states())

    def endpoint(self, name: str) -> Endpoint:
        workspace = self.status(name)
        if workspace.endpoint is None:
            raise Conflict(
                f"workspace '{name}' is {workspace.state.value}, so it has no endpoint",
                hint=f"start it: rockpool workspace start --runtime incus {name}",
            )
        return workspace.endpoint

    def clone(self, source: str, new_name: str) -> Workspace:
        """`incus copy` of a stopped workspace: copy-on-write on btrfs, zfs and lvm-thin
        pools, a whole copy on dir. The copy gets new proxy ports (its source's would
        clash) and, from Incus, a new volatile.uuid: its own identity at its first start."""
        check_slug(new_name, "workspace name")
        with self._locked(source):
            instance = self._instance(source)
            if instance["status"] != "Stopped":
                raise Conflict(
                    f"workspace '{source}' is {instance['status'].lower()}; clone a stopped one",
                    hint=f"stop it first: rockpool workspace stop --runtime incus {source}",
                )
            if self.incus.instance(new_name) is not None:
                raise Conflict(f"an instance named '{new_name}' exists already on Incus")
            argv = ["copy", self.incus.ref(source), self.incus.ref(new_name)]
            if self.target:
                argv += ["--target", self.target]
            argv += ["--config", f"{CLONED_FROM_KEY}={source}"]
            argv += ["--config", f"{CREATED_KEY}={utc_now()}"]
            try:
                self.incus.run(*argv)
            except CommandFailed as exc:
                raise translate(exc, f"cloning '{source}' to '{new_name}'") from None
        with self._locked(new_name):
            self._place_ports(self._instance(new_name), keep=False)
        return self.status(new_name)

    def remove(self, name: str, force: bool = False) -> None:
        with self._locked(name):
            instance = self._instance(name)
            if instance["status"] != "Stopped" and not force:
                raise Conflict(
                    f"workspace '{name}' is {instance['status'].lower()}",
                    hint=f"stop it first, or: rockpool workspace rm --runtime incus --force {name}",
                )
            argv = ["delete", self.incus.ref(name)] + (["--force"] if force else [])
            self.incus.run(*argv)
            shutil.rmtree(self.configs / name, ignore_errors=True)  # a VM's config disk

    def _problems(self, instances: builtins.list[dict[str, Any]]) -> dict[str, Damaged]:
        """What is wrong with each instance whose rockpool config cannot be trusted."""
        problems = {}
        for instance in instances:
            if instance.get("config") is None:
                continue  # its member is down: status says so
            image = _config(instance)[IMAGE_KEY]
            name, _, version = str(image).partition(":")
            if not (is_slug(instance["name"]) and is_slug(name) and version):
                problems[instance["name"]] = Damaged(
                    f"the Incus instance {instance['name']} has {IMAGE_KEY}={image!r}, "
                    "no NAME:VERSION",
                    hint=f"look at it: incus config show {instance['name']}",
                )
        return problems

    def damaged(self) -> builtins.list[Damaged]:
        return builtins.list(self._problems(self._ours()).values())

    def list(self) -> builtins.list[Workspace]:
        instances = self._ours()
        bad = self._problems(instances)
        members = self._member_states()
        return [self._workspace(i, members) for i in instances if i["name"] not in bad]

    # ---- snapshots --------------------------------------------------------------------------

    def snapshots(self, name: str) -> builtins.list[Snapshot]:
        self._instance(name)
        found = self.incus.json("snapshot", "list", self.incus.ref(name))
        return [Snapshot(s["name"], str(s.get("created_at", ""))) for s in found]

    def _snapshot_verb(self, verb: str, name: str, snapshot: str) -> None:
        check_slug(snapshot, "snapshot name")
        with self._locked(name):
            self._instance(name)
            try:
                self.incus.run("snapshot", verb, self.incus.ref(name), snapshot)
            except CommandFailed as exc:
                raise translate(exc, f"snapshot '{snapshot}' of '{name}'") from None

    def snapshot(self, name: str, snapshot: str) -> Snapshot:
        self._snapshot_verb("create", name, snapshot)
        return next(s for s in self.snapshots(name) if s.name == snapshot)

    def restore(self, name: str, snapshot: str) -> Workspace:
        """The disk as it was at snapshot; a running workspace is stopped first."""
        check_slug(snapshot, "snapshot name")
        with self._locked(name):
            instance = self._instance(name)
            if snapshot not in {s.name for s in self.snapshots(name)}:
                raise NotFound(
                    f"workspace '{name}' has no snapshot '{snapshot}'",
                    hint=f"list them: rockpool workspace snapshot ls --runtime incus {name}",
                )
            if instance["status"] != "Stopped":
                self.incus.run("stop", self.incus.ref(name), "--force")
            self.incus.run("snapshot", "restore", self.incus.ref(name), snapshot)
        return self.status(name)

    def remove_snapshot(self, name: str, snapshot: str) -> None:
        self._snapshot_verb("delete", name, snapshot)

    # ---- dynamic ports ----------------------------------------------------------------------

    def ports(self, name: str) -> builtins.list[PortForward]:
        instance = self._instance(name)
        running = instance["status"] == "Running"
        devices = _devices(instance)
        return [
            PortForward(
                guest,
                self.listen if running else None,
                _listen_port(devices.get(f"{PORT_DEVICE}{guest}")) if running else None,
            )
            for guest in sorted(_dynamic_ports(instance))
        ]

    def add_port(self, name: str, guest_port: int) -> PortForward:
        with self._locked(name):
            instance = self._instance(name)
            ports = set(_dynamic_ports(instance))
            if guest_port in GUEST_PORTS.values():
                raise InvalidInput(f"port {guest_port} is forwarded already (code-server, SSH)")
            if guest_port not in ports and len(ports) >= DYNAMIC_PORTS_LIMIT:
                raise Conflict(f"workspace '{name}' has {DYNAMIC_PORTS_LIMIT} ports already")
            ports.add(guest_port)
            self._set_config(name, PORTS_KEY, json.dumps(sorted(ports)))
            # A proxy device can be added to a running instance: the port is live at once.
            self._place_ports(self._instance(name))
        return next(p for p in self.ports(name) if p.guest_port == guest_port)

    def remove_port(self, name: str, guest_port: int) -> None:
        with self._locked(name):
            instance = self._instance(name)
            ports = set(_dynamic_ports(instance))
            if guest_port not in ports:
                raise NotFound(f"workspace '{name}' has no dynamic port {guest_port}")
            ports.discard(guest_port)
            self._set_config(name, PORTS_KEY, json.dumps(sorted(ports)))
            self._place_ports(self._instance(name))


def _is_ours(instance: dict[str, Any]) -> bool:
    """A workspace's instance: it has rockpool's image key, or Incus cannot read its
    config because its member is down (so it may be one; give workspaces a project of
    their own, docs/incus.md)."""
    return instance.get("config") is None or IMAGE_KEY in _config(instance)


def _dynamic_ports(instance: dict[str, Any]) -> builtins.list[int]:
    """The guest ports the workspace forwards beside code-server's and SSH's."""
    return [int(port) for port in json.loads(_config(instance).get(PORTS_KEY, "[]"))]


def _config(instance: dict[str, Any]) -> dict[str, Any]:
    # An instance on an offline cluster member comes with null config and devices.
    return instance.get("config") or {}


def _devices(instance: dict[str, Any]) -> dict[str, Any]:
    return instance.get("devices") or {}


def _proxy(listen: str, port: int, guest_port: int) -> dict[str, str]:
    return {
        "type": "proxy",
        "bind": "host",
        "listen": f"tcp:{listen}:{port}",
        "connect": f"tcp:127.0.0.1:{guest_port}",
    }


def _listen_port(device: dict[str, Any] | None) -> int | None:
    if not device or device.get("type") != "proxy":
        return None
    port = str(device.get("listen", "")).rpartition(":")[2]
    return int(port) if port.isdigit() else None

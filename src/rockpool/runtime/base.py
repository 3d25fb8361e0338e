"""The one interface every workspace runtime implements (QEMU, Tart and Incus), and
the parts they share: workspace records and the config disk written at each start.

A runtime is one module with one Runtime subclass, and one line in the registry
(runtime/__init__.py); everything else (the CLI, image rm and image gc) asks the
registry, never a runtime by name."""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import fcntl
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rockpool.config_disk import make_config_disk, validate_env
from rockpool.errors import Conflict, Damaged, InvalidInput, NotFound
from rockpool.files import write_private
from rockpool.keys import check_authorized_keys
from rockpool.names import check_slug, is_instance_id, is_slug, is_version_id

if TYPE_CHECKING:
    from rockpool.store import Store, Version

RECORD = "workspace.json"
CONFIG_DISK = "config.img"
AUTHORIZED_KEYS = "authorized_keys"


class State(StrEnum):
    """What the runtime itself says, asked each time: never a stored flag."""

    STOPPED = "stopped"
    RUNNING = "running"
    PAUSED = "paused"  # the VM exists but its guest does not run (paused)
    SUSPENDED = "suspended"  # no VM; its saved state is resumed by the next start
    FAILED = "failed"  # the VM exists but its guest stopped for good (details: reason)


@dataclass(frozen=True)
class Endpoint:
    """Where the worker reaches a running workspace: code-server, SSH and the dynamic
    ports (guest port -> host port), all TCP on host. network "isolated": only the
    clients (root, the store's owner, Caddy, ROCKPOOL_CLIENTS) may connect; "open": any
    local user may (docs/security.md)."""

    host: str
    port: int
    ssh_port: int | None = None
    ports: dict[int, int] = field(default_factory=dict)
    network: str = "open"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"


@dataclass(frozen=True)
class PortForward:
    """A dynamic port: guest_port inside the workspace, reached at host:host_port while
    it runs (host_port None while it is stopped)."""

    guest_port: int
    host: str | None = None
    host_port: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["url"] = f"http://{self.host}:{self.host_port}/" if self.host_port else None
        return data


@dataclass(frozen=True)
class Workspace:
    name: str
    runtime: str
    image: str  # NAME:VERSION it was created from, for good
    state: State
    created: str
    cloned_from: str | None = None
    endpoint: Endpoint | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        if self.endpoint is not None:
            data["endpoint"]["url"] = self.endpoint.url
        return data


@dataclass(frozen=True)
class Snapshot:
    """A saved state of a workspace's disk, by name; restore brings the disk back to it."""

    name: str
    created: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Holdings:
    """What a runtime's workspaces still need of the store: each file they are built on
    (an image version's disk, a clone layer), or a version's directory as a whole, and
    which workspaces use it.

    unreadable names the workspaces whose needs could not be read: while there are any,
    nothing may be deleted, for it might be theirs; hint says how to look into them."""

    files: dict[Path, builtins.list[str]] = field(default_factory=dict)
    unreadable: builtins.list[str] = field(default_factory=list)
    hint: str = "remove a broken one with: rockpool workspace rm --force NAME"

    def users(self, directory: Path) -> builtins.list[str]:
        """The workspaces built on a file in directory (an image version), or on it."""
        return sorted(
            {
                name
                for path, names in self.files.items()
                if directory in (path, path.parent)
                for name in names
            }
        )

    def problem(self) -> Conflict | None:
        if not self.unreadable:
            return None
        return Conflict(
            "cannot tell what the disks of these workspaces are built on: "
            + ", ".join(self.unreadable),
            hint=self.hint,
        )


class Runtime(ABC):
    """Create, start, stop, clone and remove workspaces from stored images.

    Every method takes workspace names that follow the init contract's slug rule and
    raises RockpoolError subclasses (InvalidInput, NotFound, Conflict, MissingTool).

    Each runtime also answers for itself what image rm and image gc need (under the
    store's exclusive lock): which versions its workspaces still need (holdings), what
    of its own it can delete (remove_unused), and it installs and uninstalls versions.
    """

    name: ClassVar[str]  # its registry name, and --runtime's
    title: ClassVar[str]  # for people: "QEMU", "Tart"
    default_image: ClassVar[str]  # the image `workspace create` takes when given none
    installs_images: ClassVar[bool] = False  # whether `image install --runtime` offers it
    # Its own keyword arguments (the CLI's flags of the same names), e.g. Incus's remote.
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, store: Store) -> None:
        self.store = store

    def available(self) -> bool:
        """Whether this host can run it (Tart: a `tart` on PATH). image rm and image gc
        ask only the runtimes that are: where one is not, it has no workspaces."""
        return True

    # ---- images: what rm and gc ask -----------------------------------------------------

    @abstractmethod
    def install_image(self, version: Version) -> str:
        """Make a version ready to run; returns what the runtime runs it as (Tart: its
        VM's name; QEMU, which needs no install: the qcow2 disk). Idempotent."""

    def uninstall_image(self, version: Version) -> bool:
        """Undo install_image for a version image rm or gc removed (after the store's
        lock is released); False when nothing was installed."""
        return False

    @abstractmethod
    def holdings(self) -> Holdings:
        """The files of the store its workspaces are built on, or were created from;
        damaged records included. Read from the store: image rm and gc refuse to delete
        what is in it."""

    def remove_unused(self) -> builtins.list[Path]:
        """Delete what of its own in the store no workspace needs any more, and what
        interrupted operations left; returns what it deleted."""
        return []

    @abstractmethod
    def create(self, name: str, image_ref: str) -> Workspace: ...

    @abstractmethod
    def start(
        self, name: str, env: Mapping[str, str] | None = None, authorized_keys: str | None = None
    ) -> Workspace: ...

    @abstractmethod
    def stop(self, name: str, timeout: float = 90.0, suspend: bool = False) -> Workspace:
        """Power the workspace off, or with suspend save its running guest's state for
        the next start to resume (runtimes that cannot refuse it: _no_suspend)."""

    def _no_suspend(self, why: str) -> InvalidInput:
        return InvalidInput(
            f"the {self.name} runtime does not suspend workspaces: {why}",
            hint="stop it without --suspend; see docs/workspaces.md, 'Suspend and resume'",
        )

    @abstractmethod
    def status(self, name: str) -> Workspace: ...

    @abstractmethod
    def endpoint(self, name: str) -> Endpoint: ...

    @abstractmethod
    def clone(self, source: str, new_name: str) -> Workspace: ...

    @abstractmethod
    def remove(self, name: str, force: bool = False) -> None: ...

    @abstractmethod
    def damaged(self) -> builtins.list[Damaged]:
        """What is wrong with each workspace whose record cannot be trusted; list()
        leaves those out, and remove(name, force=True) removes them."""

    @abstractmethod
    def list(self) -> builtins.list[Workspace]: ...

    # Dynamic ports: an app in the guest listens on a port, the worker registers it and
    # routes Caddy to its forward. Kept across stop and start.
    def ports(self, name: str) -> builtins.list[PortForward]:
        raise self._no_ports()

    def add_port(self, name: str, guest_port: int) -> PortForward:
        raise self._no_ports()

    def remove_port(self, name: str, guest_port: int) -> None:
        raise self._no_ports()

    # Snapshots of a workspace's disk, by name: Incus's own (copy-on-write where the
    # pool is). A runtime without them says so.
    def snapshots(self, name: str) -> builtins.list[Snapshot]:
        raise self._no_snapshots()

    def snapshot(self, name: str, snapshot: str) -> Snapshot:
        raise self._no_snapshots()

    def restore(self, name: str, snapshot: str) -> Workspace:
        raise self._no_snapshots()

    def remove_snapshot(self, name: str, snapshot: str) -> None:
        raise self._no_snapshots()

    def _no_snapshots(self) -> InvalidInput:
        return InvalidInput(
            f"the {self.name} runtime keeps no snapshots of workspaces",
            hint="clone a stopped workspace instead: rockpool workspace clone SOURCE NAME",
        )

    def _no_ports(self) -> InvalidInput:
        return InvalidInput(
            f"the {self.name} runtime forwards no ports: the host reaches its guests' "
            "addresses directly",
            hint="dial the address of `rockpool workspace status NAME --json` on the app's port",
        )


# ---- shared by the runtimes -------------------------------------------------------------


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def workspace_dir(root: Path, name: str) -> Path:
    return root / check_slug(name, "workspace name")


RECORD_LIMIT = 1 << 20  # a record rockpool wrote is a few hundred bytes


def _field_problem(record: dict[str, Any], name: str) -> str | None:
    """What is wrong with the fields every runtime's record has, if anything."""
    image = record.get("image")
    image_name, _, image_version = image.partition(":") if isinstance(image, str) else ("", "", "")
    if record.get("name") != name:
        return f"its name is {record.get('name')!r}, not the directory's '{name}'"
    if not (is_slug(image_name) and is_version_id(image_version)):
        return f"image {image!r} is no NAME:VERSION"
    if not is_instance_id(record.get("instance_id")):
        return f"instance_id {record.get('instance_id')!r} is no instance id"
    if not isinstance(record.get("created"), str):
        return "it has no creation time"
    cloned_from = record.get("cloned_from")
    if cloned_from is not None and not is_slug(cloned_from):
        return f"cloned_from {cloned_from!r} is no workspace name"
    return None


def read_record(
    root: Path,
    name: str,
    check: Callable[[dict[str, Any]], str | None] | None = None,
) -> dict[str, Any]:
    """ROOT/NAME/workspace.json, its fields checked (check adds a runtime's own);
    NotFound when there is no such workspace, Damaged when it cannot be trusted."""
    path = workspace_dir(root, name) / RECORD
    hint = f"remove the workspace with: rockpool workspace rm --force {name}"
    try:
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise Damaged(f"the record {path} is not a regular file", hint=hint)
        with open(path, "rb") as handle:
            data = handle.read(RECORD_LIMIT + 1)
    except FileNotFoundError:
        raise NotFound(
            f"no workspace named '{name}'", hint="list them with: rockpool workspace ls"
        ) from None
    except OSError as exc:
        raise Damaged(f"the record {path} cannot be read: {exc.strerror}", hint=hint) from None
    try:
        if len(data) > RECORD_LIMIT:
            raise ValueError(f"it is over {RECORD_LIMIT} bytes")
        record = json.loads(data.decode("utf-8"))
        if not isinstance(record, dict):
            raise ValueError(f"it holds {type(record).__name__}, not an object")
    except (ValueError, RecursionError) as exc:
        raise Damaged(f"the record {path} is damaged: {exc}", hint=hint) from None
    problem = _field_problem(record, name) or (check(record) if check else None)
    if problem:
        raise Damaged(f"the record {path} is damaged: {problem}", hint=hint)
    return record


@contextlib.contextmanager
def locked_workspace(root: Path, name: str, *, damaged_ok: bool = False) -> Iterator[Path]:
    """Hold the workspace's lock (start, stop, clone and remove of one workspace take
    turns); yields its directory. NotFound when there is no such workspace, also when
    it was removed while this waited for the lock."""
    directory = workspace_dir(root, name)

    def exists() -> bool:
        try:
            read_record(root, name)
        except Damaged:
            if not damaged_ok:
                raise
        return True

    exists()  # NotFound or Damaged before waiting
    try:
        lock = open(directory / ".lock", "a")  # noqa: SIM115 (held across the yield)
    except FileNotFoundError:
        exists()
        raise
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        exists()  # the holder before us may have removed it
        yield directory


def record_names(root: Path) -> list[str]:
    """The workspace directories under root that have a record, sorted; half-made ones
    (.new-*) and removed ones (.removed-*) are skipped."""
    if not root.is_dir() or root.is_symlink():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if is_slug(p.name) and not p.is_symlink() and (p / RECORD).exists()
    )


def readable_records(
    root: Path, check: Callable[[dict[str, Any]], str | None] | None = None
) -> tuple[dict[str, dict[str, Any]], list[Damaged]]:
    """Every workspace's record under root, and what is wrong with those that are
    damaged (listed apart, so one bad record never hides the others)."""
    records, damaged = {}, []
    for name in record_names(root):
        try:
            records[name] = read_record(root, name, check)
        except Damaged as exc:
            damaged.append(exc)
        except NotFound:
            continue  # removed meanwhile
    return records, damaged


def start_values(
    name: str, instance_id: str, env: Mapping[str, str] | None, authorized_keys: str | None
) -> tuple[dict[str, str], str | None]:
    """What one start of workspace NAME gives its guest, checked before anything is
    written (a private key is never stored): the variables, with
    ROCKPOOL_WORKSPACE_NAME and ROCKPOOL_INSTANCE_ID set, and the keys if given."""
    variables = dict(env or {})
    given = variables.pop("ROCKPOOL_WORKSPACE_NAME", name)
    if given != name:
        raise InvalidInput(
            f"ROCKPOOL_WORKSPACE_NAME is the workspace's name ('{name}'), not '{given}'"
        )
    variables.update({"ROCKPOOL_WORKSPACE_NAME": name, "ROCKPOOL_INSTANCE_ID": instance_id})
    validate_env(variables)
    keys = (
        check_authorized_keys(authorized_keys, "authorized_keys")
        if authorized_keys is not None
        else None
    )
    return variables, keys


def check_timeout(timeout: float) -> float:
    if not math.isfinite(timeout) or timeout < 0:
        raise InvalidInput(f"the stop timeout must be a number of seconds >= 0, not {timeout}")
    return timeout


def write_config_disk(
    directory: Path,
    name: str,
    instance_id: str,
    env: Mapping[str, str] | None,
    authorized_keys: str | None,
) -> Path:
    """DIRECTORY/config.img for one start of workspace NAME (the init contract's config disk).

    ROCKPOOL_WORKSPACE_NAME is always the workspace's name and ROCKPOOL_INSTANCE_ID the
    record's, so a clone (new id) makes its own SSH host keys and machine-id. Keys given
    once are kept in DIRECTORY/authorized_keys and reused by later starts that give none.
    """
    return write_boot_values(
        directory, *boot_values(directory, name, instance_id, env, authorized_keys)
    )


def write_boot_values(
    directory: Path, variables: dict[str, str], keys: str | None, given_keys: str | None
) -> Path:
    """DIRECTORY/config.img from values boot_values gave, and the keys given kept."""
    config_disk = make_config_disk(directory / CONFIG_DISK, variables, keys)
    if given_keys is not None:
        write_private(directory / AUTHORIZED_KEYS, given_keys)
    return config_disk


def boot_values(
    directory: Path,
    name: str,
    instance_id: str,
    env: Mapping[str, str] | None,
    authorized_keys: str | None,
) -> tuple[dict[str, str], str | None, str | None]:
    """What one start gives the guest: the variables and the keys it gets (those given,
    else those kept from an earlier start), and the keys given."""
    variables, given_keys = start_values(name, instance_id, env, authorized_keys)
    keys_file = directory / AUTHORIZED_KEYS
    keys = given_keys or (keys_file.read_text() if keys_file.is_file() else None)
    return variables, keys, given_keys

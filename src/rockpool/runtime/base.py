"""The one interface every workspace runtime implements (QEMU and Tart; Incus next), and
the parts they share: workspace records and the config disk written at each start."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from rockpool.carrier import validate_env, write_carrier
from rockpool.errors import Conflict, InvalidInput, NotFound
from rockpool.names import check_slug

RECORD = "workspace.json"
CONFIG_DISK = "config.img"
AUTHORIZED_KEYS = "authorized_keys"


class State(StrEnum):
    STOPPED = "stopped"
    RUNNING = "running"


@dataclass(frozen=True)
class Endpoint:
    """Where the worker reaches a running workspace: code-server, and SSH."""

    host: str
    port: int
    ssh_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"


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


class Runtime(ABC):
    """Create, start, stop, clone and remove workspaces from stored images.

    Every method takes workspace names that follow the init contract's slug rule and
    raises RockpoolError subclasses (InvalidInput, NotFound, Conflict, MissingTool).
    """

    name: str

    @abstractmethod
    def create(self, name: str, image_ref: str) -> Workspace: ...

    @abstractmethod
    def start(
        self, name: str, env: Mapping[str, str] | None = None, authorized_keys: str | None = None
    ) -> Workspace: ...

    @abstractmethod
    def stop(self, name: str, timeout: float = 90.0) -> Workspace: ...

    @abstractmethod
    def status(self, name: str) -> Workspace: ...

    @abstractmethod
    def endpoint(self, name: str) -> Endpoint: ...

    @abstractmethod
    def clone(self, source: str, new_name: str) -> Workspace: ...

    @abstractmethod
    def remove(self, name: str, force: bool = False) -> None: ...

    @abstractmethod
    def list(self) -> list[Workspace]: ...


# ---- shared by the runtimes -------------------------------------------------------------


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def workspace_dir(root: Path, name: str) -> Path:
    return root / check_slug(name, "workspace name")


def read_record(root: Path, name: str) -> dict[str, Any]:
    """ROOT/NAME/workspace.json; NotFound when there is no such workspace."""
    path = workspace_dir(root, name) / RECORD
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(
            f"no workspace named '{name}'", hint="list them with: rockpool workspace ls"
        ) from None
    except ValueError as exc:
        raise Conflict(f"workspace '{name}' has a damaged record ({path}): {exc}") from None
    return record


@contextlib.contextmanager
def locked_workspace(root: Path, name: str) -> Iterator[Path]:
    """Hold the workspace's lock (start, stop, clone and remove of one workspace take
    turns); yields its directory. NotFound when there is no such workspace."""
    directory = workspace_dir(root, name)
    if not (directory / RECORD).is_file():
        read_record(root, name)  # raises NotFound
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield directory


def record_names(root: Path) -> list[str]:
    """The workspaces under root that have a record, sorted; half-made ones are skipped."""
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if not p.name.startswith(".") and (p / RECORD).is_file()
    )


def write_config_disk(
    directory: Path,
    name: str,
    instance_id: str,
    env: Mapping[str, str] | None,
    authorized_keys: str | None,
) -> Path:
    """DIRECTORY/config.img for one start of workspace NAME (the init contract's carrier).

    ROCKPOOL_WORKSPACE_NAME is always the workspace's name and ROCKPOOL_INSTANCE_ID the
    record's, so a clone (new id) makes its own SSH host keys and machine-id. Keys given
    once are kept in DIRECTORY/authorized_keys and reused by later starts that give none.
    """
    variables = dict(env or {})
    given = variables.pop("ROCKPOOL_WORKSPACE_NAME", name)
    if given != name:
        raise InvalidInput(
            f"ROCKPOOL_WORKSPACE_NAME is the workspace's name ('{name}'), not '{given}'"
        )
    variables.update({"ROCKPOOL_WORKSPACE_NAME": name, "ROCKPOOL_INSTANCE_ID": instance_id})
    validate_env(variables)
    keys_file = directory / AUTHORIZED_KEYS
    if authorized_keys is not None:
        keys_file.write_text(authorized_keys)
    keys = keys_file.read_text() if keys_file.is_file() else None
    return write_carrier(directory / CONFIG_DISK, variables, keys)

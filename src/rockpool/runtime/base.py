"""The one interface every workspace runtime implements (QEMU now; Tart and Incus next)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


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

"""The `incus` CLI, Incus's documented and stable interface: every call the Incus runtime
makes goes through one Incus object, bound to a remote and a project.

The client finds its server the way it always does: INCUS_DIR (a local daemon's
directory, the tests'), INCUS_CONF (the client's remotes and certificates, default
~/.config/incus) and the remote named here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rockpool import tools
from rockpool.command import clean_environment, run
from rockpool.errors import CommandFailed, Conflict, MissingTool, NotFound

# What the client reads from the caller's environment.
CLIENT_VARIABLES = ("INCUS_DIR", "INCUS_CONF", "INCUS_SOCKET", "INCUS_INSECURE_TLS")
# How long a question to a server that may be down waits (`image gc` asks every runtime).
PROBE_TIMEOUT = 10.0
NOT_FOUND = re.compile(r"not found|doesn't exist|does not exist", re.IGNORECASE)
UNREACHABLE = re.compile(
    r"doesn't appear to be started|connection refused|no such file or directory.*socket|"
    r"unable to connect|i/o timeout|no route to host",
    re.IGNORECASE,
)
NO_VMS = re.compile(r"virtual-machine is not supported|vhost_vsock|KVM", re.IGNORECASE)


@dataclass(frozen=True)
class Incus:
    """One Incus server (a remote of the client's, or the local daemon) and project."""

    remote: str | None = None
    project: str | None = None

    def ref(self, name: str) -> str:
        """NAME as the client addresses it on this remote."""
        return f"{self.remote}:{name}" if self.remote else name

    @property
    def server(self) -> str:
        return f"{self.remote}:" if self.remote else "local:"

    def _argv(self, args: Sequence[str | Path]) -> list[str | Path]:
        # `incus query` takes no --project: its path carries the project (query()).
        project = ["--project", self.project] if self.project and args[0] != "query" else []
        return ["incus", *project, *args]

    def run(
        self,
        *args: str | Path,
        capture: bool = False,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        tools.require(tools.INCUS_RUNTIME, "the Incus runtime")
        env = clean_environment({k: os.environ[k] for k in CLIENT_VARIABLES if k in os.environ})
        try:
            return run(
                self._argv(args),
                env=env,
                capture=capture,
                timeout=timeout,
            )
        except CommandFailed as exc:
            if UNREACHABLE.search(exc.stderr_tail):
                raise MissingTool(
                    f"no Incus server answers at {self.server.rstrip(':')}: "
                    f"{_last_error(exc.stderr_tail)}",
                    hint="start incusd (see docs/incus.md), or name a running server with "
                    "--remote (or $ROCKPOOL_INCUS_REMOTE; a local daemon: $INCUS_DIR)",
                ) from None
            raise

    def json(self, *args: str | Path, timeout: float | None = None) -> Any:
        return json.loads(self.run(*args, "--format", "json", capture=True, timeout=timeout).stdout)

    def query(
        self,
        path: str,
        timeout: float | None = None,
        method: str = "GET",
        data: dict[str, Any] | None = None,
    ) -> Any:
        """One REST request through the client (its remotes, certificates), in the project."""
        if self.project:
            path += ("&" if "?" in path else "?") + f"project={self.project}"
        request = ["-X", method] + (["--data", json.dumps(data)] if data is not None else [])
        result = self.run("query", *request, f"{self.server}{path}", capture=True, timeout=timeout)
        return json.loads(result.stdout) if result.stdout.strip() else None

    def reachable(self) -> bool:
        """Whether the client is installed and its server answers."""
        if tools.missing(tools.INCUS_RUNTIME):
            return False
        try:
            self.query("/1.0", timeout=PROBE_TIMEOUT)
        except (CommandFailed, MissingTool, ValueError, subprocess.TimeoutExpired):
            return False
        return True

    # ---- instances ------------------------------------------------------------------------

    def instances(self) -> list[dict[str, Any]]:
        return list(self.json("list", self.server))

    def instance(self, name: str) -> dict[str, Any] | None:
        """The instance named name (Incus's full record), None if there is none."""
        found = self.json("list", f"{self.server}^{re.escape(name)}$")
        return found[0] if found else None

    # ---- images ---------------------------------------------------------------------------

    def image(self, fingerprint: str) -> dict[str, Any] | None:
        try:
            return dict(self.query(f"/1.0/images/{fingerprint}"))
        except CommandFailed as exc:
            if NOT_FOUND.search(exc.stderr_tail):
                return None
            raise

    def images(self) -> list[dict[str, Any]]:
        return list(self.json("image", "list", self.server))


def split_fingerprint(metadata: Path, rootfs: Path) -> str:
    """The fingerprint Incus gives a split image: sha256 of the metadata tarball's bytes
    followed by the root's (squashfs or qcow2). Known before importing, so an install
    that finds it needs no second import."""
    digest = hashlib.sha256()
    for part in (metadata, rootfs):
        with open(part, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def translate(exc: CommandFailed, what: str) -> Exception:
    """Incus's own error as the project's: NotFound, or MissingTool for a server that
    cannot run VMs; the CommandFailed itself otherwise."""
    tail = exc.stderr_tail
    if NO_VMS.search(tail):
        return MissingTool(
            f"this Incus server cannot run virtual machines: {_last_error(tail)}",
            hint="VMs need KVM (/dev/kvm) and the vhost_vsock kernel module on the member "
            "(modprobe vhost_vsock); or create a system container: --type container",
        )
    if NOT_FOUND.search(tail):
        return NotFound(f"{what}: {_last_error(tail)}")
    if "already exists" in tail:
        return Conflict(f"{what}: {_last_error(tail)}")
    return exc


def _last_error(tail: str) -> str:
    lines = [line.removeprefix("Error: ").strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"

"""Real incusd daemons that the tests start and stop themselves (REFERENCE.md, Incus).

Each has its own INCUS_DIR, INCUS_SKIP_INSTANCE_TYPES=1 (no lookup of a public image
server), no image auto-update and no managed network: its only traffic is on loopback,
to its own socket and, in a cluster, between members on 127.0.0.2-4.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rockpool.tools import TEST_DAEMONS

INCUSD = TEST_DAEMONS["incusd"][1]
READY_TIMEOUT = 120


def daemon_directory(prefix: str) -> Path:
    """A fresh directory for incusd's state. Not below pytest's tmp_path: that is 0700
    root's, and an unprivileged container's root (a uid of its own range) must pass
    through every directory above its root filesystem."""
    directory = Path(tempfile.mkdtemp(prefix=f"rockpool-{prefix}-", dir="/var/tmp"))
    directory.chmod(0o711)
    return directory


class Daemon:
    """One incusd: its directory, its process, and the client bound to it."""

    def __init__(self, directory: Path, name: str = "local") -> None:
        self.directory = directory
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "INCUS_DIR": str(self.directory)}

    def start(self) -> None:
        self.directory.mkdir(mode=0o711, parents=True, exist_ok=True)
        log = open(self.directory / "incusd.log", "ab")  # noqa: SIM115 (the daemon's, kept open)
        self.process = subprocess.Popen(
            [INCUSD, "--group", "root"],
            env={**self.env, "INCUS_SKIP_INSTANCE_TYPES": "1"},
            stdout=log,
            stderr=log,
        )
        self.incus(
            "admin", "waitready", "--timeout", str(READY_TIMEOUT), timeout=READY_TIMEOUT + 10
        )

    def incus(
        self, *args: str, check: bool = True, timeout: float = 300, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["incus", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=stdin,
        )
        if check:
            assert result.returncode == 0, f"incus {' '.join(args)}: {result.stderr[-2000:]}"
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.incus(*args, "--format", "json").stdout)

    def pool_used(self, pool: str) -> int:
        """The bytes `incus storage info` says pool uses: its own on btrfs; on dir, the
        whole filesystem's, so measure a dir pool's directory instead."""
        info = self.incus("storage", "info", pool, "--bytes").stdout
        found = re.search(r'space used: "?(\d+)"?', info)
        assert found, info
        return int(found.group(1))

    def preseed(self, data: dict[str, Any]) -> None:
        # JSON is YAML.
        self.incus("admin", "init", "--preseed", stdin=json.dumps(data))

    def kill(self) -> None:
        """kill -9, as a member that fails."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.incus("admin", "shutdown", "--timeout", "60", check=False, timeout=120)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        # Monitors of instances that outlived a killed daemon.
        monitor = f"^\\[lxc monitor\\] {re.escape(str(self.directory))}/"
        subprocess.run(["pkill", "-9", "-f", monitor], check=False)
        unmount_below(self.directory)
        shutil.rmtree(self.directory, ignore_errors=True)


def unmount_below(directory: Path) -> None:
    """Every mount at or below directory (storage pools, shared mounts), deepest first."""
    prefix = str(directory.resolve())
    for _ in range(5):
        with open("/proc/self/mounts") as mounts:
            points = [line.split()[1] for line in mounts]
        below = sorted(
            (p for p in points if p == prefix or p.startswith(prefix + "/")), reverse=True
        )
        if not below:
            return
        for point in below:
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        time.sleep(0.2)  # lazy unmounts finish detaching


def root_profile(pool: str = "default") -> dict[str, Any]:
    return {"name": "default", "devices": {"root": {"path": "/", "pool": pool, "type": "disk"}}}


@contextmanager
def standalone() -> Iterator[Daemon]:
    """A single server: the default pool is btrfs on a loop file (copy-on-write copies),
    and a second pool, plain, is dir (whole copies), to compare."""
    daemon = Daemon(daemon_directory("incus"))
    daemon.start()
    try:
        daemon.preseed(
            {
                "config": {"images.auto_update_interval": "0"},
                "storage_pools": [
                    {"name": "default", "driver": "btrfs", "config": {"size": "8GiB"}},
                    {"name": "plain", "driver": "dir"},
                ],
                "profiles": [root_profile()],
            }
        )
        yield daemon
    finally:
        daemon.stop()


MEMBER_ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
PORT = 8443


@contextmanager
def cluster() -> Iterator[list[Daemon]]:
    """Three members, m1-m3, on 127.0.0.2-4 port 8443, each its own incusd and dir pool."""
    directory = daemon_directory("incus-cluster")
    members = [Daemon(directory / f"m{n}", f"m{n}") for n in range(1, 4)]
    try:
        first = members[0]
        first.start()
        first.preseed(
            {
                "config": {
                    "core.https_address": f"{MEMBER_ADDRESSES[0]}:{PORT}",
                    "images.auto_update_interval": "0",
                },
                "storage_pools": [{"name": "default", "driver": "dir"}],
                "profiles": [root_profile()],
                "cluster": {"server_name": "m1", "enabled": True},
            }
        )
        for member, address in zip(members[1:], MEMBER_ADDRESSES[1:], strict=True):
            token = first.incus("cluster", "add", member.name, "--quiet").stdout.strip()
            member.start()
            member.preseed(
                {
                    "cluster": {
                        "enabled": True,
                        "server_name": member.name,
                        "server_address": f"{address}:{PORT}",
                        "cluster_token": token,
                        "member_config": [
                            {
                                "entity": "storage-pool",
                                "name": "default",
                                "key": "source",
                                "value": "",
                            }
                        ],
                    }
                }
            )
        yield members
    finally:
        for member in reversed(members):
            member.stop()
        shutil.rmtree(directory, ignore_errors=True)

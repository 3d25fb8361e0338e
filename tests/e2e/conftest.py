"""Shared fixtures for the end-to-end tests: one store and one default image per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rockpool.store import Store, Version

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SPEC = REPO / "images" / "workspace.toml"


@pytest.fixture(scope="session")
def store_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    existing = os.environ.get("ROCKPOOL_TEST_STORE")
    if existing:  # reuse a store between local runs; CI always starts empty
        return Path(existing)
    return tmp_path_factory.mktemp("store")


def rockpool_env(home: Path) -> dict[str, str]:
    return {**os.environ, "ROCKPOOL_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def run_rockpool(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real CLI, as the worker calls it, against the test store."""
    return subprocess.run(
        [sys.executable, "-m", "rockpool", *args],
        env=rockpool_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def built_image(store_home: Path) -> Version:
    """The default image, built once per run by the real CLI."""
    result = run_rockpool(store_home, "image", "build", str(DEFAULT_SPEC), "--json", timeout=3600)
    assert result.returncode == 0, f"build failed:\n{result.stderr[-4000:]}"
    built = json.loads(result.stdout)
    store = Store(store_home)
    assert list(store.staging_dir.iterdir()) == [], "a build left staging directories behind"
    return store.version(built["name"], built["version"])


@pytest.fixture(scope="session")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rockpool-test", "-f", str(key)],
        check=True,
    )
    return key

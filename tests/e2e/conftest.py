"""Shared fixtures for the end-to-end tests: one store and one default image per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rockpool.store import Store, Version

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SPEC = REPO / "images" / "workspace.toml"
# The default spec and setup.sh without code-server: the guest that the workspace
# lifecycle and isolation tests boot, which need no code-server.
MINIMAL_SPEC = REPO / "tests" / "specs" / "small.toml"
# CI builds the small arm64 test spec; ROCKPOOL_TEST_ARM64_SPEC=images/workspace-arm64.toml
# runs the same tests on the full image (an hour or more of emulated building).
ARM64_SPEC = Path(os.environ.get("ROCKPOOL_TEST_ARM64_SPEC", REPO / "tests/specs/arm64.toml"))


@pytest.fixture(scope="session")
def store_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    existing = os.environ.get("ROCKPOOL_TEST_STORE")
    # A store to reuse between local runs. CI passes one that holds only the stage
    # cache's bootstraps of the test specs, made by scripts/check-fresh-root.sh.
    if existing:
        return Path(existing)
    return tmp_path_factory.mktemp("store")


def rockpool_env(home: Path) -> dict[str, str]:
    return {**os.environ, "ROCKPOOL_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def run_rockpool(
    home: Path, *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real CLI, as the worker calls it, against the test store (env: more variables)."""
    return subprocess.run(
        [sys.executable, "-m", "rockpool", *args],
        env={**rockpool_env(home), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class BackgroundBuild:
    """A build by the real CLI that runs while other tests boot VMs.

    The arm64 test image is built under qemu-user emulation: mostly one busy core for
    many minutes. With idle=True it runs at the lowest CPU priority, on what the tests
    in front leave over (they still run about 9 % slower beside it: BENCHMARKS.md).
    """

    def __init__(
        self,
        home: Path,
        spec: Path,
        work: Path,
        *extra: str,
        idle: bool = False,
        wrapper: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        umask: int = -1,
    ) -> None:
        """wrapper, env and umask change the host the build sees (one CPU, say)."""
        self.home, self.spec, self.work, self.extra = home, spec, work, extra
        self.idle, self.wrapper, self.env, self.umask = idle, wrapper, env or {}, umask
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None:
            return
        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.work / "stdout.json", "wb") as out, open(self.work / "stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [
                    *(("nice", "-n", "19") if self.idle else ()),
                    *self.wrapper,
                    *(sys.executable, "-m", "rockpool", "image", "build", str(self.spec)),
                    *("--json", *self.extra),
                ],
                env={**rockpool_env(self.home), **self.env},
                umask=self.umask,
                stdout=out,
                stderr=err,
            )

    def result(self, timeout: float) -> Version:
        self.start()
        assert self.proc is not None
        returncode = self.proc.wait(timeout=timeout)
        stderr = (self.work / "stderr").read_text(errors="replace")
        assert returncode == 0, f"build of {self.spec} failed:\n{stderr[-4000:]}"
        built = json.loads((self.work / "stdout.json").read_text())
        return Store(self.home).version(built["name"], built["version"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=120)


@pytest.fixture(scope="session")
def arm64_build(
    store_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundBuild]:
    build = BackgroundBuild(
        store_home, ARM64_SPEC, tmp_path_factory.mktemp("arm64-build"), idle=True
    )
    yield build
    build.stop()


@pytest.fixture(scope="session", autouse=True)
def arm64_build_from_the_start(request: pytest.FixtureRequest) -> None:
    """When the run holds the arm64 tests, their image (its bootstrap too, all of it
    under emulation) builds from the first end-to-end test on, beside the others."""
    if os.environ.get("ROCKPOOL_TEST_ARM64_IMAGE"):
        return  # the arm64 tests take that one, built before
    if any("arm64_image" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("arm64_build").start()


def build_by_cli(home: Path, spec: Path, *extra: str) -> Version:
    """An image built by the real CLI into home; the build leaves no staging behind
    (the background arm64 build's own may be there before and after)."""
    store = Store(home)
    before = set(store.staging_dir.iterdir()) if store.staging_dir.is_dir() else set()
    result = run_rockpool(home, "image", "build", str(spec), "--json", *extra, timeout=3600)
    assert result.returncode == 0, f"build of {spec} failed:\n{result.stderr[-4000:]}"
    built = json.loads(result.stdout)
    left = set(store.staging_dir.iterdir()) - before
    assert left == set(), f"a build left staging directories behind: {left}"
    return store.version(built["name"], built["version"])


@pytest.fixture(scope="session")
def minimal_image(store_home: Path) -> Version:
    """MINIMAL_SPEC, built and verified by the real CLI (CI's clean-root check leaves
    its bootstrap in the cache). Its guests are ready when SSH answers."""
    return build_by_cli(store_home, MINIMAL_SPEC)


@pytest.fixture(scope="session")
def built_image(store_home: Path) -> Version:
    """The default image, built once per run by the real CLI.

    Built with --no-lock: the committed lock ages as Debian's archive moves on (a
    security update removes the version it pins), and the VM tests must not depend on
    that. Locked builds are tested on a lock made by the test (test_reproducible.py);
    the committed lock's agreement with the spec by tests/unit/test_lock.py.
    """
    return build_by_cli(store_home, DEFAULT_SPEC, "--no-lock")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The arm64 tests last: their image builds in the background meanwhile."""
    items.sort(key=lambda item: "test_tart_arm64" in item.nodeid)


@pytest.fixture(scope="session")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rockpool-test", "-f", str(key)],
        check=True,
    )
    return key

"""A build killed (kill -9), interrupted (Ctrl-C, SIGTERM) or out of disk at any stage
leaves no partial version and no mount, loop device or process behind, and the next
build succeeds.

The small test spec builds in a store of its own. Its stage cache lets each test reach
the stage it interrupts quickly: the entries of that stage and the later ones are pruned
first, so that stage, and not a cached copy of its result, is what runs.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rockpool.store import Store
from tests.e2e.conftest import REPO, rockpool_env, run_rockpool
from tests.e2e.proxy import authenticated_proxy

pytestmark = pytest.mark.vm
SMALL_SPEC = REPO / "tests" / "specs" / "small.toml"
DEADLINE = 900.0
NAME = "test-small"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small spec with another description: new build inputs (so the stored version
    is not simply reused) whose every stage has the small spec's cache keys."""
    path = tmp_path_factory.mktemp("variant") / "faults.toml"
    path.write_text(f'extends = "{SMALL_SPEC}"\n[image]\ndescription = "fault tests"\n')
    return path


def logs(home: Path) -> set[Path]:
    return set((home / "logs").glob("*.log"))


class Build:
    """One `rockpool image build` of the small spec by the real CLI."""

    def __init__(self, home: Path, *extra: str, spec: Path = SMALL_SPEC) -> None:
        self.home = home
        self.logs_before = logs(home)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rockpool", "image", "build", str(spec), *extra],
            env=rockpool_env(home),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_for(self, *markers: str) -> None:
        """Until this build's own log shows each marker, in order."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            ended = self.proc.poll() is not None
            text = "".join(
                p.read_text(errors="replace") for p in logs(self.home) - self.logs_before
            )
            position = 0
            for marker in markers:
                position = text.find(marker, position)
                if position < 0:
                    break
            else:
                return
            assert not ended, f"build ended early: {self.stderr()}"
            time.sleep(0.2)  # poll interval for the log
        raise AssertionError(f"the build log never showed {markers!r}")

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr else ""

    def kill(self, sig: int = signal.SIGKILL) -> tuple[int, str]:
        if self.proc.poll() is None:  # the landing may have been quicker than the look
            os.kill(self.proc.pid, sig)
        _, stderr = self.proc.communicate(timeout=180)
        return self.proc.returncode, stderr


def processes() -> Iterator[tuple[Path, bytes]]:
    """(/proc/PID, its command line) of every process that is still there."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield entry, (entry / "cmdline").read_bytes()
            except OSError:
                continue


def leftovers(home: Path) -> list[str]:
    """Processes, mounts and loop devices that still refer to the store."""
    found = []
    root = str(home)
    for entry, argv in processes():
        if int(entry.name) == os.getpid():
            continue
        cmdline = argv.replace(b"\0", b" ").decode(errors="replace")
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if root in cmdline or cwd.startswith(root):
            found.append(f"process {entry.name}: {cmdline[:160]}")
    found += [
        f"mount {line.split()[4]}"
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if root in line
    ]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    found += [f"loop {line}" for line in loops.splitlines() if root in line]
    return found


def assert_clean(home: Path, versions_before: list[str]) -> None:
    deadline = time.monotonic() + 30
    while (left := leftovers(home)) and time.monotonic() < deadline:
        time.sleep(0.2)  # the killed build's children die after it
    assert left == []
    store = Store(home)
    assert [v.id for v in store.versions(NAME)] == versions_before
    assert store.damaged(NAME) == []
    for version_dir in (store.images_dir / NAME).glob("*"):
        if version_dir.is_dir() and not version_dir.name.startswith("."):
            assert (version_dir / "manifest.json").is_file(), f"partial version {version_dir}"
    latest = store.latest_id(NAME)
    assert latest is None or latest in versions_before
    listed = run_rockpool(home, "cache", "ls", "--json")
    assert listed.returncode == 0
    assert [e for e in json.loads(listed.stdout)["entries"] if e["damaged"]] == []


def versions(home: Path) -> list[str]:
    return [v.id for v in Store(home).versions(NAME)]


def prune(home: Path, *stages: str) -> None:
    for stage in stages:
        result = run_rockpool(home, "cache", "prune", "--all", "--stage", stage)
        assert result.returncode == 0, result.stderr


@pytest.fixture
def before(home: Path) -> Iterator[list[str]]:
    existing = versions(home)
    yield existing
    assert_clean(home, existing)


# ---- cold: preflight and bootstrap ----------------------------------------------------


def test_kill_9_in_the_preflight(home: Path, before: list[str]) -> None:
    build = Build(home, "--no-verify")
    build.wait_for("stage preflight: started")
    build.kill()


def test_kill_9_in_the_bootstrap(home: Path, before: list[str]) -> None:
    build = Build(home, "--no-verify")
    build.wait_for("stage bootstrap: started", "installing remaining packages inside the chroot")
    build.kill()
    assert any(Store(home).staging_dir.iterdir())  # the dead build's, swept by the next


def test_sigterm_in_the_bootstrap_exits_143(home: Path, before: list[str]) -> None:
    build = Build(home, "--no-verify")
    build.wait_for("stage bootstrap: started", "Setting up")
    code, stderr = build.kill(signal.SIGTERM)
    assert code == 143, stderr
    assert "interrupted by SIGTERM" in stderr and "Traceback" not in stderr
    assert list(Store(home).staging_dir.iterdir()) == []  # cleaned up at once


def test_a_build_after_the_interruptions_lands(home: Path) -> None:
    result = run_rockpool(
        home, "image", "build", str(SMALL_SPEC), "--no-verify", "--json", timeout=DEADLINE
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(Store(home).staging_dir.iterdir()) == []  # the dead builds' directories


# ---- from the cache: provision, disk, each format, verify, landing --------------------


def test_ctrl_c_in_the_provision_exits_130(home: Path, variant: Path, before: list[str]) -> None:
    prune(home, "provision", "disk", "formats")
    build = Build(home, "--no-verify", spec=variant)
    build.wait_for("stage provision: started", "setup.sh: ")
    code, stderr = build.kill(signal.SIGINT)
    assert code == 130, stderr
    assert "interrupted by SIGINT" in stderr and "Traceback" not in stderr


def test_kill_9_in_the_provision(home: Path, variant: Path, before: list[str]) -> None:
    prune(home, "provision", "disk", "formats")
    build = Build(home, "--no-verify", spec=variant)
    build.wait_for("stage provision: started", "setup.sh: ")
    build.kill()


def test_kill_9_in_the_disk_stage(home: Path, variant: Path, before: list[str]) -> None:
    prune(home, "disk", "formats")
    build = Build(home, "--no-verify", spec=variant)
    build.wait_for("stage disk: started", "mke2fs")
    build.kill()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_kill_9_while_writing_a_format(
    home: Path, variant: Path, before: list[str], fmt: str
) -> None:
    prune(home, "formats")
    build = Build(home, "--no-verify", spec=variant)
    build.wait_for("stage formats: started", f"format {fmt}: writing")
    build.kill()


def test_kill_9_in_the_verifying_boot(home: Path, variant: Path, before: list[str]) -> None:
    build = Build(home, spec=variant)  # every stage cached: the boot is what runs
    build.wait_for("stage verify: started", "-accel")
    build.kill()  # the VM dies with the build: assert_clean finds no QEMU


def test_an_image_that_does_not_come_up_stays_out_of_latest(
    home: Path, variant: Path, before: list[str]
) -> None:
    """Here it is given too little time to boot: the same path as a broken image."""
    latest = Store(home).latest_id(NAME)
    failed = subprocess.run(
        [sys.executable, "-m", "rockpool", "image", "build", str(variant)],
        env={**rockpool_env(home), "ROCKPOOL_VERIFY_TIMEOUT": "8"},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert failed.returncode == 5, failed.stderr[-2000:]
    assert "the new image did not come up when booted" in failed.stderr
    assert "SSH did not answer within" in failed.stderr and "it was not landed" in failed.stderr
    assert "console ends:" in failed.stderr  # the firmware's first lines at least
    assert Store(home).latest_id(NAME) == latest


def test_kill_9_while_landing(home: Path, variant: Path) -> None:
    """The landing takes milliseconds, so the kill may come just after it; either way
    the store is whole. tests/unit/test_store.py kills a landing at each of its steps."""
    existing = versions(home)
    build = Build(home, "--no-verify", spec=variant)  # all cached: straight to the landing
    build.wait_for("stage store: started")
    build.kill()
    left = versions(home)
    assert set(existing) <= set(left) and len(left) <= len(existing) + 1
    assert_clean(home, left)


def test_the_next_build_succeeds_and_is_verified(home: Path) -> None:
    result = run_rockpool(home, "image", "build", str(SMALL_SPEC), "--json", timeout=DEADLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    built = json.loads(result.stdout)
    verification = built["manifest"]["verification"]
    assert verification["verified"] is True and "SSH" in verification["how"]
    assert Store(home).resolve(NAME).id == built["version"]
    assert_clean(home, versions(home))


# ---- a full disk ----------------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "full"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300M", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_clearly_and_leaves_the_store_whole(
    home: Path, small_filesystem: Path
) -> None:
    store = small_filesystem / "store"
    # Start from the other store's cached bootstrap, so the build fills the disk later
    # on, restoring and provisioning the root, not only in mmdebstrap.
    (store / "cache").mkdir(parents=True)
    subprocess.run(
        ["cp", "-a", str(home / "cache" / "bootstrap"), str(store / "cache" / "bootstrap")],
        check=False,  # it may not all fit: the build then meets the full disk sooner
    )
    failed = run_rockpool(store, "image", "build", str(SMALL_SPEC), "--no-verify", timeout=DEADLINE)
    assert failed.returncode == 5, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr and failed.stderr.count("error:") >= 1
    assert "no space left on" in failed.stderr.lower()
    assert_clean(store, [])
    assert list(Store(store).staging_dir.iterdir()) == []
    # Given room, the next build in the same store succeeds.
    subprocess.run(["mount", "-o", "remount,size=6G", str(small_filesystem)], check=True)
    result = run_rockpool(store, "image", "build", str(SMALL_SPEC), "--no-verify", timeout=DEADLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_clean(store, versions(store))


# ---- secrets: proxy credentials ---------------------------------------------------------


def _argvs_holding(secret: bytes) -> list[str]:
    return [f"{entry.name}: {argv[:200]!r}" for entry, argv in processes() if secret in argv]


def _holds(path: Path, needles: list[bytes]) -> bool:
    """Whether the file holds a needle, read in chunks (the cache holds root tarballs)."""
    overlap = max(len(needle) for needle in needles) - 1
    tail = b""
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            window = tail + chunk
            if any(needle in window for needle in needles):
                return True
            tail = window[-overlap:] if overlap else b""
    return False


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    return [
        str(path)
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink() and _holds(path, needles)
    ]


def test_proxy_credentials_reach_the_proxy_and_no_argv_log_or_file(
    home: Path, variant: Path
) -> None:
    secret = f"s3cret-{os.getpid()}"
    prune(home, "bootstrap", "provision", "disk", "formats")
    with authenticated_proxy("builder", secret) as (port, proxy):
        url = f"http://builder:{secret}@127.0.0.1:{port}"
        env = {**rockpool_env(home), "http_proxy": url, "https_proxy": url, "no_proxy": ""}
        build = subprocess.Popen(
            [
                *(sys.executable, "-m", "rockpool", "image", "build", str(variant)),
                *("--until", "provision", "--json"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # Everything in /proc, every 50 ms, while the bootstrap and setup.sh fetch through it.
        seen: list[str] = []
        while build.poll() is None:
            seen += [a for a in _argvs_holding(secret.encode()) if str(build.pid) not in a]
            time.sleep(0.05)  # the scan's interval, not a wait for anything
        out, err = build.communicate()
    assert build.returncode == 0, err.decode(errors="replace")[-3000:]
    assert seen == []
    assert proxy.allowed > 0 and proxy.refused == 0  # the build went through it, with them
    assert "deb.debian.org" in proxy.hosts
    encoded = base64.b64encode(f"builder:{secret}".encode())
    assert secret.encode() not in out + err
    log = Path(json.loads(out)["log"])
    assert log.is_relative_to(home) and log.stat().st_size > 0  # searched below, with the rest
    assert _files_holding(home, [secret.encode(), encoded]) == []

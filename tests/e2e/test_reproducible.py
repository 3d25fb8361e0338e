"""Reproducible and incremental builds of the small test spec (tests/specs/small.toml).

Two stores stand for two machines' worth of state: store A builds step by step through
its stage cache, store B builds cold, in the background, at another time and in another
build directory. Which stages ran is read from each version's manifest ("stages").
"""

from __future__ import annotations

import json
import lzma
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rockpool.build.cache import CacheEntry, StageCache
from rockpool.build.preflight import fetch
from rockpool.diff import diff_versions
from rockpool.lock import parse_packages_index
from rockpool.store import Store, Version
from tests.e2e.conftest import REPO, BackgroundBuild, run_rockpool

pytestmark = pytest.mark.vm
SMALL_SPEC = REPO / "tests" / "specs" / "small.toml"
BUILD_TIMEOUT = 1800


def variant(directory: Path, name: str, body: str) -> Path:
    """A spec that extends the small spec with a few changed keys."""
    path = directory / f"{name}.toml"
    path.write_text(f'extends = "{SMALL_SPEC}"\n{body}')
    return path


def build(home: Path, spec: Path, *extra: str) -> dict[str, Any]:
    """A build without the verifying boot: these tests are about the bytes."""
    result = run_rockpool(
        home, "image", "build", str(spec), "--json", "--no-verify", *extra, timeout=BUILD_TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    built: dict[str, Any] = json.loads(result.stdout)
    return built


def stages(built: dict[str, Any]) -> dict[str, str]:
    result: dict[str, str] = built["stages"]
    return result


@pytest.fixture(scope="module")
def cold_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundBuild]:
    """Store B's cold build of the small spec, running while store A works."""
    home = tmp_path_factory.mktemp("store-b")
    work = tmp_path_factory.mktemp("store-b-build")
    background = BackgroundBuild(home, SMALL_SPEC, work, "--no-verify")
    background.start()
    yield background
    background.stop()


@pytest.fixture(scope="module")
def home_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store-a")


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("specs")


def test_adding_a_format_reuses_the_disk_and_cold_builds_are_identical(
    home_a: Path, specs: Path, cold_b: BackgroundBuild
) -> None:
    raw_only = build(home_a, variant(specs, "raw-only", '[image]\nformats = ["raw"]\n'))
    assert set(stages(raw_only).values()) == {"built"}

    both = build(home_a, SMALL_SPEC)
    # incus-container reads the root tree: the build restores the provisioned root for
    # it, and still links the cached disk.
    assert stages(both) == {
        "preflight": "skipped",
        "bootstrap": "skipped",
        "provision": "cached",
        "disk": "cached",
        "formats/raw": "cached",
        "formats/qcow2": "built",
        "formats/incus": "built",
        "formats/incus-container": "built",
    }
    assert both["manifest"]["outputs"]["raw"] == raw_only["manifest"]["outputs"]["raw"]

    # Store B built every stage itself, from nothing, meanwhile.
    cold = cold_b.result(timeout=BUILD_TIMEOUT)
    assert set(cold.manifest["stages"].values()) == {"built"}
    assert cold.id == both["version"]
    for name, output in cold.manifest["outputs"].items():
        assert output["sha256"] == both["manifest"]["outputs"][name]["sha256"], name
    assert cold.manifest["source_date_epoch"] == both["manifest"]["source_date_epoch"]

    diff = run_rockpool(home_a, "image", "diff", both["image"], both["image"], "--json")
    assert diff.returncode == 0, diff.stderr
    assert json.loads(diff.stdout)["identical"] is True


def test_unchanged_inputs_reuse_the_version(home_a: Path) -> None:
    again = build(home_a, SMALL_SPEC)
    assert again["reused"] is True


def test_a_setup_script_change_reuses_the_bootstrap(home_a: Path, specs: Path) -> None:
    before = Store(home_a).resolve("test-small:latest")
    script = specs / "setup.sh"
    original = (REPO / "images" / "scripts" / "setup.sh").read_text()
    script.write_text(original + "\necho 'tuned' > /etc/rockpool-tuned\n")
    tuned = build(home_a, variant(specs, "tuned", f'[provision]\nscript = "{script}"\n'))
    assert stages(tuned) == {
        "preflight": "built",
        "bootstrap": "cached",
        "provision/node": "cached",  # Node.js and npm from the earlier build
        "provision": "built",
        "disk": "built",
        "formats/raw": "built",
        "formats/qcow2": "built",
        "formats/incus": "built",
        "formats/incus-container": "built",
    }
    assert tuned["version"] != before.id

    diff = run_rockpool(home_a, "image", "diff", before.ref, tuned["image"], "--json")
    assert diff.returncode == 0, diff.stderr
    files = json.loads(diff.stdout)["files"]
    assert files["added"] == ["/etc/rockpool-tuned"]
    assert files["removed"] == []
    # The script itself is not in the image, and the reused Node.js and npm are the
    # bytes a fresh install gives, so nothing else may differ.
    assert files["changed"] == {}, list(files["changed"])[:10]


def test_a_damaged_cache_entry_is_rebuilt_not_used(home_a: Path) -> None:
    store = Store(home_a)
    cache = StageCache.of_store(home_a)
    tuned = store.resolve("test-small:latest")

    def sharing(entry: CacheEntry) -> list[Version]:
        inode = entry.file("disk.raw").stat().st_ino
        return [
            v for v in store.versions("test-small") if v.output_path("raw").stat().st_ino == inode
        ]

    # The small spec's cached disk is a hard link of its versions' raw disks: remove
    # those versions, then flip one byte of the cached copy.
    disk_entry = next(e for e in cache.entries() if e.stage == "disk" and tuned not in sharing(e))
    small_versions = sharing(disk_entry)
    both = next(v for v in small_versions if "incus-container" in v.manifest["outputs"])
    for version in small_versions:
        removed = run_rockpool(home_a, "image", "rm", version.ref)
        assert removed.returncode == 0, removed.stderr
    offset = int(disk_entry.facts["disk"]["root_offset"]) + 4096
    with open(disk_entry.file("disk.raw"), "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
        os.fsync(handle.fileno())

    rebuilt = build(home_a, SMALL_SPEC)
    assert stages(rebuilt) == {
        "preflight": "skipped",
        "bootstrap": "skipped",
        "provision": "cached",
        "disk": "built",
        "formats/raw": "built",  # its cached copy was the same damaged file
        "formats/qcow2": "cached",
        "formats/incus": "cached",
        "formats/incus-container": "cached",
    }
    assert rebuilt["version"] == both.id  # the same bytes again, not the damaged ones

    listed = json.loads(run_rockpool(home_a, "cache", "ls", "--json").stdout)
    assert {row["stage"] for row in listed["entries"]} == {
        "bootstrap",
        "provision",
        "node",
        "disk",
        "formats",
    }


def older_available_version(locked: dict[str, str]) -> tuple[str, str] | None:
    """A locked library that the archive also has in an older version (an older
    security update, superseded by a point release), to pin a build to."""
    available: dict[str, set[str]] = {}
    suites = (("debian", "trixie"), ("debian", "trixie-updates"))
    for base, suite in (*suites, ("debian-security", "trixie-security")):
        url = f"http://deb.debian.org/{base}/dists/{suite}/main/binary-amd64/Packages.xz"
        for name, versions in parse_packages_index(lzma.decompress(fetch(url, None))).items():
            available.setdefault(name, set()).update(versions)
    # Leaf libraries: no other package requires their exact version.
    for name in ("libnghttp2-14", "libssh2-1t64", "libcurl4t64", "libjq1", "libzstd1"):
        for version in sorted(available.get(name, set()) - {locked.get(name, "")}):
            older = subprocess.run(
                ["dpkg", "--compare-versions", version, "lt", locked.get(name, "0")]
            )
            if name in locked and older.returncode == 0:
                return name, version
    return None


def test_a_lock_reuses_the_resolving_build_and_pins_every_version(
    home_a: Path, specs: Path, cold_b: BackgroundBuild
) -> None:
    spec = variant(specs, "locked", "")  # the small spec, with a lock of its own
    locked = run_rockpool(home_a, "image", "lock", str(spec), "--json", timeout=BUILD_TIMEOUT)
    assert locked.returncode == 0, locked.stderr[-3000:]
    resolved = json.loads(locked.stdout)
    lock_file = specs / "locked.lock.json"
    assert resolved["lock"] == str(lock_file)
    entry = json.loads(lock_file.read_text())["architectures"]["amd64"]
    installed = resolved["manifest"]["packages"]
    assert entry["debian"]["packages"] == installed["debian"]
    assert entry["npm"]["node"]["version"] == installed["npm"]["node"]
    assert entry["npm"]["node"]["integrity"].startswith("sha512-")
    assert entry["source_date_epoch"] == resolved["manifest"]["source_date_epoch"]

    # The first locked build starts from the resolving build's cached results.
    first = build(home_a, spec)
    assert stages(first)["disk"] == "cached"
    assert first["version"] == resolved["version"]

    # A cold build in the other store from the same lock, but with one library pinned
    # to an older version the archive still has: apt must install exactly that.
    pin = older_available_version(entry["debian"]["packages"])
    if pin is None:
        pytest.skip("the archive has no older version of any candidate library today")
    name, version = pin
    entry["debian"]["packages"][name] = version
    pinned_spec = variant(specs, "pinned", "")
    (specs / "pinned.lock.json").write_text(
        json.dumps({"schema": 1, "architectures": {"amd64": entry}})
    )
    cold_b.result(timeout=BUILD_TIMEOUT)  # one build at a time in store B
    pinned = build(cold_b.home, pinned_spec)
    assert set(stages(pinned).values()) == {"built"}
    assert pinned["manifest"]["packages"]["debian"] == entry["debian"]["packages"]
    diff = diff_versions(
        Store(home_a).version("test-small", resolved["version"]),
        Store(cold_b.home).version("test-small", pinned["version"]),
    )
    assert diff["packages"]["debian"] == {
        "added": [],
        "removed": [],
        "changed": {name: {"from": installed["debian"][name], "to": version}},
    }


def test_a_locked_version_gone_from_the_mirror_fails_before_the_bootstrap(
    home_a: Path, specs: Path
) -> None:
    locked_spec = specs / "locked.toml"
    lock_file = specs / "locked.lock.json"
    document = json.loads(lock_file.read_text())
    document["architectures"]["amd64"]["debian"]["packages"]["bash"] = "0.0-gone"
    lock_file.write_text(json.dumps(document))
    result = run_rockpool(home_a, "image", "build", str(locked_spec), timeout=600)
    assert result.returncode == 2, result.stderr
    assert "bash 0.0-gone" in result.stderr
    assert "snapshot.debian.org" in result.stderr
    assert "==> bootstrap" not in result.stderr
    assert "Traceback" not in result.stderr


def test_cache_prune_empties_the_cache(home_a: Path) -> None:
    """Last: the tests above start from store A's cached results."""
    listed = json.loads(run_rockpool(home_a, "cache", "ls", "--json").stdout)
    assert listed["entries"]
    pruned = json.loads(run_rockpool(home_a, "cache", "prune", "--all", "--json").stdout)
    assert len(pruned["removed"]) == len(listed["entries"])
    assert json.loads(run_rockpool(home_a, "cache", "ls", "--json").stdout)["entries"] == []
    # The versions are untouched: the cache only held hard links of their files.
    for version in Store(home_a).versions("test-small"):
        assert version.output_path("raw").is_file()

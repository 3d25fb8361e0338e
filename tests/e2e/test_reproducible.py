"""Reproducible and incremental builds of the small test spec (tests/specs/small.toml).

Two stores stand for two machines' worth of state: store A builds step by step through
its stage cache, store B builds cold, in the background, at another time and in another
build directory, on a host that differs as far as one machine allows: one CPU instead of
all, another time zone and umask. Which stages ran is read from each version's manifest
("stages"). A third store stands for a second operator, who verifies store A's version.
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
from rockpool.errors import NotFound
from rockpool.lock import LOCK_SCHEMA, parse_packages_index
from rockpool.reproduce import render_verification
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
    background = BackgroundBuild(
        home,
        SMALL_SPEC,
        work,
        "--no-verify",
        wrapper=("taskset", "--cpu-list", "0"),
        env={"TZ": "Pacific/Chatham", "LANG": "de_DE.UTF-8"},
        umask=0o027,
    )
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
    # ... on one CPU: make -j, zstd -T0 and the like saw another machine.
    assert cold.manifest["build_host"]["cpus"] == 1
    if len(os.sched_getaffinity(0)) > 1:
        assert both["manifest"]["build_host"]["cpus"] > 1
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
        json.dumps({"schema": LOCK_SCHEMA, "architectures": {"amd64": entry}})
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


def test_a_second_operator_verifies_a_version_as_identical(home_a: Path, tmp_path: Path) -> None:
    """A version copied into another store, as a second operator receives it, is rebuilt
    there from the inputs it recorded (no cache, no boot): the same bytes."""
    version = Store(home_a).resolve("test-small")
    setup = Path(version.manifest["spec"]["setup_script"])
    assert (version.path / "inputs" / "setup.sh").read_bytes() == setup.read_bytes()
    assert version.manifest["build_host"]["tools"]["e2fsprogs"]  # the host's, named
    home_c = tmp_path / "operator-2"
    (home_c / "images" / "test-small").mkdir(parents=True, mode=0o700)
    home_c.chmod(0o700)
    copied = home_c / "images" / "test-small" / version.id
    subprocess.run(["cp", "-a", "--sparse=always", version.path, copied], check=True)

    result = run_rockpool(
        home_c, "image", "verify", f"test-small:{version.id}", "--json", timeout=BUILD_TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["identical"] is True
    assert report["rebuilt"] == version.id
    # The small spec has no lock: verify says what that leaves to the archive of the day.
    assert any("without a lock" in line for line in report["explained"]), report["explained"]
    assert [p.name for p in (home_c / "images").iterdir()] == ["test-small"]
    assert [p.name for p in (home_c / "images" / "test-small").iterdir()] == [version.id]
    assert not list((home_c / "staging").iterdir())  # the rebuild is forgotten


def test_verify_names_what_a_rebuild_changed(home_a: Path, specs: Path) -> None:
    """A setup script that writes random bytes cannot be reproduced: verify exits 8 and
    names the file, and the regions of the raw disk where bytes differ."""
    store = Store(home_a)
    setup = Path(store.resolve("test-small").manifest["spec"]["setup_script"])
    noisy = specs / "noisy-setup.sh"
    noisy.write_text(
        setup.read_text() + "\nhead -c 16 /dev/urandom | od -An -tx1 > /etc/rockpool-noise\n"
    )
    built = build(home_a, variant(specs, "noisy", '[provision]\nscript = "noisy-setup.sh"\n'))

    result = run_rockpool(
        home_a, "image", "verify", built["image"], "--json", timeout=BUILD_TIMEOUT
    )
    assert result.returncode == 8, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["identical"] is False
    changed = report["diff"]["files"]["changed"]
    assert list(changed) == ["/etc/rockpool-noise"], changed
    assert set(changed["/etc/rockpool-noise"]) == {"sha256"}
    assert "root filesystem" in {span["region"] for span in report["diff"]["disk_bytes"]}
    assert report["diff"]["packages"]["debian"]["changed"] == {}
    with pytest.raises(NotFound):
        store.resolve(f"test-small:{report['rebuilt']}")  # only reported, never stored

    # What the text form shows of it (one rebuild is enough to test).
    shown = render_verification(report)
    assert "NOT identical" in shown and "/etc/rockpool-noise" in shown
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

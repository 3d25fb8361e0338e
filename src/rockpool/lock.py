"""The lock: the exact inputs a spec resolved to, so that later builds install the same.

`rockpool image lock SPEC` writes SPEC's lock beside it (images/workspace.toml ->
images/workspace.lock.json), one entry per architecture:

    source_date_epoch   the archive state's time, the build's SOURCE_DATE_EPOCH
    inputs              the spec settings the lock was resolved from
    debian.packages     every installed .deb and its exact version
    npm                 Node.js, npm and code-server: version and sha512 integrity;
                        npm.tree: every package npm installed below code-server,
                        with version and integrity; npm.lockfiles: the complete lockfile
                        of each of code-server's npm projects, which a locked build
                        installs with npm ci

A build of a locked spec pins apt to those versions, checks every npm download against
the locked integrity, takes SOURCE_DATE_EPOCH from the lock, and fails before the slow
work when a locked version is no longer available.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rockpool.errors import InvalidInput
from rockpool.files import write_json_atomic
from rockpool.spec import ImageSpec, is_installed_spec

LOCK_SCHEMA = 2  # 2: npm.tree is the installed tree, and npm.lockfiles replays it
LOCK_SUFFIX = ".lock.json"
NPM_PACKAGES = ("node", "npm", "code-server")
LOCKFILE_NAME = re.compile(r"[a-z][a-z0-9-]*")  # a file name in setup.sh's SETUP_NPM_LOCKFILES


def lock_path(spec: ImageSpec) -> Path:
    return spec.path.with_name(spec.path.name.removesuffix(".toml") + LOCK_SUFFIX)


def locked_inputs(spec: ImageSpec, bootstrap_packages: list[str]) -> dict[str, Any]:
    """What a lock is resolved from. Mirrors are left out: pointing the spec at a
    snapshot mirror must keep the lock valid."""
    return {
        "suite": spec.suite,
        "packages": sorted(bootstrap_packages),
        "node_major": spec.node_major,
        "code_server_version": spec.code_server_version,
        "npm_registry": spec.npm_registry,
    }


@dataclass(frozen=True)
class Lock:
    """One architecture's entry of a lock file."""

    path: Path
    architecture: str
    source_date_epoch: int
    inputs: dict[str, Any]
    debian: dict[str, str]
    npm: dict[str, dict[str, str]]
    npm_tree: dict[str, dict[str, str]]
    npm_lockfiles: dict[str, Any] = field(default_factory=dict)
    # The host's byte-writing tools when the lock was made (plan.BuildPlan.host_tools):
    # a build on a host with others is told so, since its bytes may differ.
    tools: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "source_date_epoch": self.source_date_epoch,
            "inputs": self.inputs,
            "debian": {"packages": self.debian},
            "npm": {**self.npm, "tree": self.npm_tree, "lockfiles": self.npm_lockfiles},
            "tools": self.tools,
        }

    def setup_variables(self) -> dict[str, str]:
        """setup.sh's SETUP_* settings for the locked npm downloads."""
        variables = {}
        for package, prefix in (("node", "NODE"), ("npm", "NPM")):
            variables[f"SETUP_{prefix}_VERSION"] = self.npm[package]["version"]
            variables[f"SETUP_{prefix}_INTEGRITY"] = self.npm[package]["integrity"]
        if "code-server" in self.npm:
            variables["SETUP_CODE_SERVER_INTEGRITY"] = self.npm["code-server"]["integrity"]
        return variables

    def apt_preferences(self) -> str:
        """An apt preferences file that makes each locked version the only candidate."""
        return "".join(
            f"Package: {name}\nPin: version {version}\nPin-Priority: 1001\n\n"
            for name, version in sorted(self.debian.items())
        )


def lockfile_text(lockfile: Any) -> str:
    """An npm lockfile as npm writes it (JSON.stringify with two spaces, and a newline)."""
    return json.dumps(lockfile, indent=2) + "\n"


def _problem(path: Path, key: str, text: str) -> InvalidInput:
    return InvalidInput(
        f"{path}: {key}: {text}",
        hint=f"regenerate it with: rockpool image lock {path.name.removesuffix(LOCK_SUFFIX)}.toml",
    )


def _versions(path: Path, key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()
    ):
        raise _problem(path, key, "must map package names to version strings")
    return dict(value)


def _integrity_record(
    path: Path, key: str, value: Any, algorithms: tuple[str, ...] = ("sha512",)
) -> dict[str, str]:
    """{"version", "integrity"}, the integrity a subresource-integrity string."""
    integrity = str(value.get("integrity", "")) if isinstance(value, dict) else ""
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("version"), str)
        or not any(integrity.startswith(f"{algorithm}-") for algorithm in algorithms)
    ):
        shown = "|".join(algorithms)
        raise _problem(path, key, f'must be {{"version": "...", "integrity": "{shown}-..."}}')
    return {"version": value["version"], "integrity": integrity}


# What npm-shrinkwrap.json files carry: sha1 for packages published long ago.
TREE_ALGORITHMS = ("sha512", "sha384", "sha256", "sha1")


def read_lock(spec: ImageSpec) -> Lock | None:
    """The lock entry for spec's architecture, or None when the spec has no lock file."""
    path = lock_path(spec)
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _problem(path, "(file)", f"is not readable JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("schema") != LOCK_SCHEMA:
        raise _problem(
            path,
            "schema",
            f"must be {LOCK_SCHEMA} (a lock of schema 1 left part of code-server's npm "
            "tree to the registry of the day)",
        )
    entries = document.get("architectures", {})
    if not isinstance(entries, dict):
        raise _problem(path, "architectures", "must be a table of architectures")
    entry = entries.get(spec.architecture)
    if entry is None:
        return None
    return parse_entry(path, spec.architecture, entry)


def read_recorded_lock(path: Path) -> Lock:
    """The lock entry a version recorded beside its manifest (build/outputs.py)."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _problem(path, "(file)", f"is not readable JSON ({exc})") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("architecture"), str):
        raise _problem(path, "architecture", "is missing")
    return parse_entry(path, entry["architecture"], entry)


def parse_entry(path: Path, architecture: str, entry: Any) -> Lock:
    """One architecture's entry, checked key by key."""
    prefix = f"architectures.{architecture}"
    if not isinstance(entry, dict):
        raise _problem(path, prefix, "must be a table")
    epoch = entry.get("source_date_epoch")
    if not isinstance(epoch, int) or epoch <= 0:
        raise _problem(path, f"{prefix}.source_date_epoch", "must be a Unix time in seconds")
    inputs = entry.get("inputs")
    if not isinstance(inputs, dict):
        raise _problem(path, f"{prefix}.inputs", "is missing")
    npm_section = entry.get("npm", {})
    if not isinstance(npm_section, dict):
        raise _problem(path, f"{prefix}.npm", "must be a table")
    npm = {
        name: _integrity_record(path, f"{prefix}.npm.{name}", npm_section[name])
        for name in NPM_PACKAGES
        if name in npm_section
    }
    for required in ("node", "npm"):
        if required not in npm:
            raise _problem(path, f"{prefix}.npm.{required}", "is missing")
    tree = npm_section.get("tree", {})
    if not isinstance(tree, dict):
        raise _problem(path, f"{prefix}.npm.tree", "must be a table")
    lockfiles = npm_section.get("lockfiles", {})
    if not isinstance(lockfiles, dict) or not all(
        isinstance(name, str) and LOCKFILE_NAME.fullmatch(name) and isinstance(content, dict)
        for name, content in lockfiles.items()
    ):
        raise _problem(path, f"{prefix}.npm.lockfiles", "must map project names to npm lockfiles")
    return Lock(
        path=path,
        architecture=architecture,
        source_date_epoch=epoch,
        inputs=inputs,
        debian=_versions(
            path, f"{prefix}.debian.packages", entry.get("debian", {}).get("packages")
        ),
        npm=npm,
        npm_tree={
            name: _integrity_record(path, f"{prefix}.npm.tree.{name}", record, TREE_ALGORITHMS)
            for name, record in tree.items()
        },
        npm_lockfiles=lockfiles,
        tools=_versions(path, f"{prefix}.tools", entry.get("tools", {})),
    )


def check_inputs(lock: Lock, current: dict[str, Any]) -> None:
    """The spec still asks for what the lock was resolved from."""
    keys = current.keys() | lock.inputs.keys()
    changed = sorted(key for key in keys if current.get(key) != lock.inputs.get(key))
    if changed:
        raise InvalidInput(
            f"{lock.path} was resolved for other inputs than {lock.path.name} now asks for "
            f"(changed: {', '.join(changed)})",
            hint="update the lock with: rockpool image lock SPEC",
        )


def check_lock_target(spec: ImageSpec) -> None:
    """Refuse, before the slow resolving build, a lock that cannot or should not be written."""
    target = lock_path(spec)
    hint = "lock a variant of your own: rockpool spec init my.toml; rockpool image lock my.toml"
    if is_installed_spec(spec.path):
        raise InvalidInput(
            f"{spec.path} is a spec of the installed rockpool: its lock ships with it, and "
            "one written there would be replaced by the next upgrade",
            hint=hint,
        )
    if not os.access(target.parent, os.W_OK):
        raise InvalidInput(
            f"cannot write the lock {target}: {target.parent} is not writable", hint=hint
        )


def write_lock(spec: ImageSpec, lock: Lock) -> Path:
    """Write or update spec's lock file; other architectures' entries are kept."""
    path = lock_path(spec)
    document: dict[str, Any] = {"schema": LOCK_SCHEMA, "architectures": {}}
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(existing, dict) and isinstance(existing.get("architectures"), dict):
                document["architectures"] = existing["architectures"]
        except ValueError:
            pass  # an unreadable lock is replaced
    document["comment"] = (
        f"Exact inputs of {spec.path.name}, written by rockpool image lock; "
        "commit it, and update it with the same command."
    )
    document["architectures"][spec.architecture] = lock.to_json()
    # Unsorted: an npm lockfile's keys keep npm's order, so that setup.sh's copy of it
    # (lockfile_text) has the bytes npm wrote in the resolving build.
    write_json_atomic(path, document, sort_keys=False)
    return path


def mismatches(lock: Lock, installed: dict[str, Any]) -> list[str]:
    """How what a build installed differs from its lock, one line per package."""
    found: list[str] = []
    debian = installed.get("debian", {})
    for name in sorted(lock.debian.keys() | debian.keys()):
        want, have = lock.debian.get(name), debian.get(name)
        if want != have:
            found.append(f"debian {name}: locked {want or '(none)'}, installed {have or '(none)'}")
    npm = installed.get("npm", {})
    for name, record in lock.npm.items():
        if npm.get(name) != record["version"]:
            found.append(f"npm {name}: locked {record['version']}, installed {npm.get(name)}")
    tree = installed.get("npm_tree", {})
    for name in sorted(lock.npm_tree.keys() | tree.keys()):
        locked, installed_record = lock.npm_tree.get(name), tree.get(name)
        if locked != installed_record:
            found.append(
                f"npm tree {name}: locked {_tree_record(locked)}, "
                f"installed {_tree_record(installed_record)}"
            )
    return found


def _tree_record(record: dict[str, str] | None) -> str:
    if record is None:
        return "(none)"
    return f"{record['version']} ({record['integrity'][:16]}...)"


# ---- availability ------------------------------------------------------------------------


def parse_packages_index(text: bytes) -> dict[str, set[str]]:
    """Package name -> versions, from a Debian Packages index."""
    found: dict[str, set[str]] = {}
    for paragraph in text.split(b"\n\n"):
        name = re.search(rb"^Package: (\S+)$", paragraph, re.MULTILINE)
        version = re.search(rb"^Version: (\S+)$", paragraph, re.MULTILINE)
        if name and version:
            found.setdefault(name.group(1).decode(), set()).add(version.group(1).decode())
    return found


def unavailable(lock: Lock, available: dict[str, set[str]]) -> list[str]:
    """Locked Debian packages whose exact version the mirrors no longer carry."""
    return [
        f"{name} {version}"
        for name, version in sorted(lock.debian.items())
        if version not in available.get(name, set())
    ]

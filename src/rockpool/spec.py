"""The image spec: one typed, validated object built from TOML.

Every problem is reported as a SpecError naming the file and the key, before any
slow work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import site
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rockpool.arch import NAMES, host_architecture
from rockpool.errors import SpecError
from rockpool.files import NotRegularFile, TooLarge, read_regular, write_whole
from rockpool.formats import ARM64_ONLY_FORMATS, FORMAT_NAMES, output_format
from rockpool.names import SLUG_RULE, is_slug
from rockpool.units import parse_size

SUITES = ("bookworm", "trixie", "forky")
MIN_DISK = 4 << 30
MAX_DISK = 2 << 40
MIN_MEMORY = 1 << 30
RESERVED_USERS = {"root", "daemon", "bin", "sys", "sync", "nobody", "sshd", "messagebus", "systemd"}
DEFAULT_SPEC = Path("images/workspace.toml")
# The specs, lock and setup.sh rockpool ships: real files in the package directory, for a
# build needs paths (the lock lies beside its spec, setup.sh is copied into the root).
PACKAGED_SPECS = Path(__file__).resolve().parent / "images"
ARM64_SPEC_NAME = "workspace-arm64.toml"
# extends = "rockpool:NAME" names a packaged spec: a variant then works wherever it lies,
# and after an upgrade of rockpool, without naming the installation's path.
PACKAGE_REFERENCE = "rockpool:"
REINSTALL = "reinstall rockpool (pipx reinstall rockpool-images, or pip install --force-reinstall)"
# code_server.version = "none": an image without code-server or its build tools, for
# tests of everything else (an emulated arm64 build skips its native modules).
NO_CODE_SERVER = "none"
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
_MIRROR = re.compile(r"^(https?|file)://\S+$")


@dataclass(frozen=True)
class ImageSpec:
    path: Path
    name: str
    suite: str
    architecture: str
    disk_size: int
    formats: tuple[str, ...]
    mirror: str
    security_mirror: str
    packages: tuple[str, ...]
    node_major: int
    npm_registry: str
    code_server_version: str | None  # None: no code-server (test images only)
    user: str
    cpus: int
    memory: int
    setup_script: Path
    description: str = ""
    extends: tuple[Path, ...] = field(default=())

    def digest_inputs(self) -> dict[str, Any]:
        """What the image depends on, independent of where the files lie."""
        data = asdict(self)
        for local in ("path", "setup_script", "extends"):
            data.pop(local)
        data["packages"] = sorted(self.packages)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], *, setup_script: Path) -> ImageSpec:
        """The spec a manifest recorded (to_json), with setup.sh at setup_script."""
        try:
            return cls(
                **{
                    **data,
                    "path": Path(data["path"]),
                    "setup_script": setup_script,
                    "extends": tuple(Path(p) for p in data.get("extends", ())),
                    "formats": tuple(data["formats"]),
                    "packages": tuple(data["packages"]),
                }
            )
        except (KeyError, TypeError) as exc:
            raise SpecError(
                Path(str(data.get("path", "manifest.json"))),
                "(recorded spec)",
                f"the manifest's spec is not one this rockpool reads ({exc})",
            ) from None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["setup_script"] = str(self.setup_script)
        data["extends"] = [str(p) for p in self.extends]
        data["formats"] = list(self.formats)
        data["packages"] = list(self.packages)
        return data


def default_spec_path() -> Path:
    """./images/workspace.toml when the current directory has one (a checkout, or a
    project laid out as one), else the default spec packaged with rockpool."""
    packaged = PACKAGED_SPECS / DEFAULT_SPEC.name
    for candidate in (Path.cwd() / DEFAULT_SPEC, packaged):
        if candidate.is_file():
            return candidate
    raise SpecError(
        DEFAULT_SPEC,
        None,
        "no spec given, and the default spec is not here",
        hint=f"pass a spec's path; rockpool's own default spec ({packaged}) is missing: "
        + REINSTALL,
    )


def packaged_spec_names() -> list[str]:
    """The specs rockpool ships, by file name (what follows rockpool: in `extends`)."""
    return sorted(p.name for p in PACKAGED_SPECS.glob("*.toml") if p.is_file())


def is_installed_spec(path: Path) -> bool:
    """Whether path is a spec of an installed rockpool (under site-packages, not in a
    checkout): what is written beside it belongs to the installation and goes with it."""
    if not path.resolve().is_relative_to(PACKAGED_SPECS):
        return False
    sites = [*site.getsitepackages(), site.getusersitepackages()]
    return any(PACKAGED_SPECS.is_relative_to(Path(s).resolve()) for s in sites)


# ---- schema -----------------------------------------------------------------------------

Check = Callable[[Any], str | None]  # returns a problem, or None when the value is fine


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "must be a non-empty string"


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, str) or value not in choices:
            return f"must be one of {', '.join(repr(c) for c in choices)}, not {value!r}"
        return None

    return check


def _size(minimum: int, maximum: int) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, str | int) or isinstance(value, bool):
            return 'must be a size such as "20G"'
        try:
            size = parse_size(str(value))
        except ValueError as exc:
            return str(exc)
        if not minimum <= size <= maximum:
            return f"must be between {minimum >> 30}G and {maximum >> 30}G, not {value!r}"
        if size % (1 << 20):
            return f"must be a whole number of MiB (disks are MiB-aligned), not {value!r}"
        return None

    return check


def _integer(minimum: int, maximum: int) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be a whole number, not {value!r}"
        if not minimum <= value <= maximum:
            return f"must be between {minimum} and {maximum}, not {value}"
        return None

    return check


def _matches(pattern: re.Pattern[str], rule: str) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            return f"{rule}, not {value!r}"
        return None

    return check


def _list_of(item: Check, *, allow_empty: bool = True) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return f"must be a list, not {type(value).__name__}"
        if not value and not allow_empty:
            return "must not be empty"
        for index, element in enumerate(value):
            problem = item(element)
            if problem:
                return f"item {index + 1}: {problem}"
        return None

    return check


def _image_name(value: Any) -> str | None:
    return None if isinstance(value, str) and is_slug(value) else f"must be {SLUG_RULE}"


def _architecture(value: Any) -> str | None:
    if value == "host" or value in NAMES:
        return None
    return f"must be 'host' or one of {', '.join(NAMES)}, not {value!r}"


def _user(value: Any) -> str | None:
    problem = _matches(_USER, "must be a lower-case Unix user name")(value)
    if problem is None and value in RESERVED_USERS:
        problem = f"'{value}' is a system account; choose another user name"
    return problem


_package = _matches(_PACKAGE, "must be a Debian package name")
_semver = _matches(_SEMVER, 'must be an exact version such as "4.139.1", or "none"')


def _code_server_version(value: Any) -> str | None:
    return None if value == NO_CODE_SERVER else _semver(value)


SCHEMA: dict[str, dict[str, Check]] = {
    "image": {
        "name": _image_name,
        "description": lambda v: None if isinstance(v, str) else "must be a string",
        "suite": _one_of(SUITES),
        "architecture": _architecture,
        "disk_size": _size(MIN_DISK, MAX_DISK),
        "formats": _list_of(_one_of(FORMAT_NAMES), allow_empty=False),
    },
    "debian": {
        "mirror": _matches(_MIRROR, "must be an http://, https:// or file:// URL"),
        "security_mirror": _matches(_MIRROR, "must be an http://, https:// or file:// URL"),
        "packages": _list_of(_package),
        "add_packages": _list_of(_package),
        "remove_packages": _list_of(_package),
    },
    "node": {
        "major": _integer(20, 99),
        "registry": _matches(_MIRROR, "must be an http:// or https:// URL"),
    },
    "code_server": {"version": _code_server_version},
    "workspace": {
        "user": _user,
        "cpus": _integer(1, 64),
        "memory": _size(MIN_MEMORY, 256 << 30),
    },
    "provision": {"script": _string},
}
TOP_LEVEL = {"extends": _string}
REQUIRED = {
    ("image", "name"),
    ("debian", "packages"),
    ("node", "major"),
    ("code_server", "version"),
    ("workspace", "user"),
    ("provision", "script"),
}
DEFAULTS: dict[tuple[str, str], Any] = {
    ("image", "suite"): "trixie",
    ("image", "architecture"): "host",
    ("image", "disk_size"): "20G",
    ("image", "formats"): ["raw", "qcow2"],
    ("image", "description"): "",
    ("debian", "mirror"): "http://deb.debian.org/debian",
    ("debian", "security_mirror"): "http://deb.debian.org/debian-security",
    ("node", "registry"): "https://registry.npmjs.org",
    ("workspace", "cpus"): 2,
    ("workspace", "memory"): "4G",
}


# ---- loading ----------------------------------------------------------------------------


@dataclass
class _Layer:
    """One spec file's validated values, with the file each value came from."""

    path: Path
    values: dict[tuple[str, str], Any]


SPEC_SIZE_LIMIT = 1 << 20  # a spec is a few hundred bytes; this stops /dev/zero and the like


def _read_toml(path: Path) -> dict[str, Any]:
    """A spec file's TOML: a regular file under the size cap, opened without blocking
    (a FIFO or a device never hangs or floods the build)."""
    try:
        data = read_regular(path, SPEC_SIZE_LIMIT)
    except FileNotFoundError:
        raise SpecError(path, None, "file not found") from None
    except NotRegularFile:
        raise SpecError(
            path, None, "is not a regular file", hint="pass the spec's .toml file"
        ) from None
    except TooLarge:
        raise SpecError(
            path, None, f"is larger than {SPEC_SIZE_LIMIT // 1024} KiB; no spec is"
        ) from None
    except OSError as exc:
        raise SpecError(path, None, f"cannot read: {exc.strerror}") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        problem = f"is not UTF-8 text: {exc.reason} at byte {exc.start}"
        raise SpecError(path, None, problem) from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(path, None, f"not valid TOML: {exc}") from None
    except RecursionError:
        raise SpecError(path, None, "nests arrays or tables too deeply to be a spec") from None


def _validate_layer(path: Path, document: dict[str, Any]) -> _Layer:
    values: dict[tuple[str, str], Any] = {}
    for section, table in document.items():
        if section in TOP_LEVEL:
            problem = TOP_LEVEL[section](table)
            if problem:
                raise SpecError(path, section, problem)
            continue
        if section not in SCHEMA:
            known = ", ".join(sorted([*SCHEMA, *TOP_LEVEL]))
            raise SpecError(path, section, f"unknown section or key (known: {known})")
        if not isinstance(table, dict):
            raise SpecError(path, section, f"must be a table ([{section}])")
        for key, value in table.items():
            if key not in SCHEMA[section]:
                known = ", ".join(SCHEMA[section])
                raise SpecError(
                    path, f"{section}.{key}", f"unknown key (known in [{section}]: {known})"
                )
            problem = SCHEMA[section][key](value)
            if problem:
                raise SpecError(path, f"{section}.{key}", problem)
            values[(section, key)] = value
    return _Layer(path, values)


def _load_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[_Layer]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise SpecError(path, "extends", f"specs extend each other in a loop: {chain}")
    document = _read_toml(path)
    layer = _validate_layer(path, document)
    if "extends" not in document:
        return [layer]
    return [*_load_layers(_extended(path, document["extends"]), (*seen, path)), layer]


def _extended(path: Path, reference: str) -> Path:
    """The spec path's `extends` names: rockpool:NAME is a packaged spec, anything else a
    path relative to path's directory."""
    if reference.startswith(PACKAGE_REFERENCE):
        name = reference.removeprefix(PACKAGE_REFERENCE)
        packaged = packaged_spec_names()
        if name not in packaged:
            known = ", ".join(PACKAGE_REFERENCE + n for n in packaged)
            raise SpecError(
                path,
                "extends",
                f"rockpool has no packaged spec '{name}' (in {PACKAGED_SPECS})",
                hint=f"extend one of: {known}" if known else f"its specs are missing: {REINSTALL}",
            )
        return PACKAGED_SPECS / name
    parent = (path.parent / reference).resolve()
    if not parent.exists():
        raise SpecError(path, "extends", f"the spec it extends does not exist: {parent}")
    return parent


def load_spec(path: Path) -> ImageSpec:
    """Load and fully validate a spec file, following `extends`."""
    layers = _load_layers(path)
    merged: dict[tuple[str, str], Any] = dict(DEFAULTS)
    origin: dict[tuple[str, str], Path] = {}
    packages: list[str] = []
    for layer in layers:
        for key, value in layer.values.items():
            merged[key] = value
            origin[key] = layer.path
        if ("debian", "packages") in layer.values:
            packages = list(layer.values[("debian", "packages")])
        for name in layer.values.get(("debian", "add_packages"), []):
            if name not in packages:
                packages.append(name)
        for name in layer.values.get(("debian", "remove_packages"), []):
            if name not in packages:
                raise SpecError(
                    layer.path, "debian.remove_packages", f"'{name}' is not in the package list"
                )
            packages.remove(name)
    top = layers[-1].path
    for required in sorted(REQUIRED):
        if required not in merged:
            raise SpecError(top, ".".join(required), "is required")

    script_key = ("provision", "script")
    script = (origin[script_key].parent / merged[script_key]).resolve()
    if not script.is_file():
        raise SpecError(
            origin[script_key], "provision.script", f"provisioning script not found: {script}"
        )
    architecture = merged[("image", "architecture")]
    if architecture == "host":
        architecture = host_architecture()
    formats = tuple(dict.fromkeys(merged[("image", "formats")]))
    arm64_only = [f for f in formats if f in ARM64_ONLY_FORMATS]
    if arm64_only and architecture != "arm64":
        formats_key = ("image", "formats")
        raise SpecError(
            origin.get(formats_key, top),
            "image.formats",
            f"{', '.join(arm64_only)} output needs an arm64 image (Tart runs only arm64 "
            f"guests on Apple Silicon), but this image is {architecture}",
            hint='set image.architecture = "arm64" (as images/workspace-arm64.toml does), '
            "or drop the Tart formats",
        )
    for name in formats:
        absent = [needed for needed in output_format(name).requires if needed not in formats]
        if absent:
            raise SpecError(
                origin.get(("image", "formats"), top),
                "image.formats",
                f"the {name} format needs {', '.join(absent)} in the same version "
                f"(it is imported beside it), but image.formats has no {', '.join(absent)}",
                hint=f"add {', '.join(repr(a) for a in absent)} to image.formats",
            )
    return ImageSpec(
        path=top,
        name=merged[("image", "name")],
        description=merged[("image", "description")],
        suite=merged[("image", "suite")],
        architecture=architecture,
        disk_size=parse_size(str(merged[("image", "disk_size")])),
        formats=formats,
        mirror=merged[("debian", "mirror")],
        security_mirror=merged[("debian", "security_mirror")],
        packages=tuple(packages),
        node_major=merged[("node", "major")],
        npm_registry=merged[("node", "registry")].rstrip("/"),
        code_server_version=(
            None
            if merged[("code_server", "version")] == NO_CODE_SERVER
            else merged[("code_server", "version")]
        ),
        user=merged[("workspace", "user")],
        cpus=merged[("workspace", "cpus")],
        memory=parse_size(str(merged[("workspace", "memory")])),
        setup_script=script,
        extends=tuple(layer.path for layer in layers[:-1]),
    )


def spec_digest(spec: ImageSpec, *extra: str) -> str:
    """sha256 over the spec's resolved inputs plus anything else the build depends on."""
    payload = json.dumps([spec.digest_inputs(), *extra], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()


# ---- variants ---------------------------------------------------------------------------

VARIANT_TEMPLATE = """\
# A variant of rockpool's {base} image: it starts from the {base} spec that the
# installed rockpool ships, and changes only what is set here. Every key is
# documented in rockpool's docs/spec.md.
# Show it resolved:  rockpool spec check {file}
# Build it:          sudo rockpool image build {file}
# Pin its packages:  sudo rockpool image lock {file}   (writes a lock beside it)
extends = "{extends}"

[image]
# The image's name in the store: its own, so that its versions are not the base's.
name = "{name}"
description = "{base}, with my changes"
# disk_size = "40G"
# formats = {formats}

[debian]
# On top of the packages of {base}; a removed one must be one of them.
# add_packages = ["htop", "ripgrep"]
# remove_packages = ["zip"]

# Defaults for the VMs made from this image:
# [workspace]
# cpus = 4
# memory = "8G"

# Another provisioning script instead of rockpool's setup.sh, relative to this file;
# it must do what setup.sh does for the init contract (docs/init-contract.md).
# [provision]
# script = "setup.sh"
"""


def init_variant(path: Path, *, arm64: bool = False, force: bool = False) -> dict[str, str]:
    """Write a small commented variant spec at path that extends the packaged default
    (or arm64) spec. An existing path is left alone unless force."""
    reference = PACKAGE_REFERENCE + (ARM64_SPEC_NAME if arm64 else DEFAULT_SPEC.name)
    exists = SpecError(
        path,
        None,
        "exists already; nothing was written",
        hint="give another file name, or pass --force to replace it",
    )
    if not force and os.path.lexists(path):
        raise exists
    base = load_spec(_extended(path, reference))  # a broken installation fails here, clearly
    # The variant's own name, so that its versions do not land among a packaged image's.
    taken = {base.name, *(Path(n).stem for n in packaged_spec_names())}
    name = path.stem if is_slug(path.stem) and path.stem not in taken else f"{base.name}-variant"
    text = VARIANT_TEMPLATE.format(
        name=name,
        base=base.name,
        file=path.name,
        extends=reference,
        formats=json.dumps(list(base.formats)),
    )
    try:
        write_whole(path, text, replace=force)
    except FileExistsError:
        raise exists from None
    except OSError as exc:
        raise SpecError(path, None, f"cannot write: {exc.strerror}") from None
    return {"path": str(path.resolve()), "name": name, "extends": reference}

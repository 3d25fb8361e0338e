"""Stage: check, in seconds, what would otherwise fail minutes into a build.

The Debian mirror must carry the suite, and the npm registry must have the pinned
code-server (for this Node.js major) and a Node.js build of that major. With a lock,
every locked Debian version must still be in the mirrors, and every locked npm download
must have the locked integrity.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import logging
import lzma
import re
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rockpool.arch import ARCHITECTURES
from rockpool.errors import ExitCode, InvalidInput, RockpoolError
from rockpool.lock import Lock, parse_packages_index, unavailable
from rockpool.spec import ImageSpec

if TYPE_CHECKING:
    from rockpool.build.context import BuildContext  # stages are called with one

log = logging.getLogger("rockpool.build.preflight")
TIMEOUT = 30


class RegistryUnreachable(RockpoolError):
    exit_code = ExitCode.COMMAND_FAILED


def fetch(url: str, ca_bundle: Path | None, accept: str = "application/json") -> bytes:
    context = ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)
    request = urllib.request.Request(url, headers={"Accept": accept})
    log.info("GET %s", url)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise FileNotFoundError(url) from None
        raise RegistryUnreachable(f"{url} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise RegistryUnreachable(
            f"cannot reach {url}: {getattr(exc, 'reason', exc)}",
            hint="check the network, proxy variables (https_proxy) and --ca-bundle",
        ) from None


def _json(ctx: BuildContext, url: str, accept: str = "application/json") -> Any:
    body = fetch(url, ctx.ca_bundle, accept)
    try:
        return json.loads(body)
    except ValueError:
        raise RegistryUnreachable(
            f"{url} did not answer with JSON (a proxy's error page?): {body[:120]!r}"
        ) from None


def engines_allow(engines_node: str, major: int) -> bool:
    """A conservative reading of package.json engines.node for one major version."""
    numbers = [int(n) for n in re.findall(r"(?<![.\d])(\d+)(?:\.[\dx*]+)*", engines_node)]
    if re.fullmatch(r"\s*[\^~]?\s*\d+(\.[\dx*]+)*\s*", engines_node):
        return numbers[0] == major
    if re.fullmatch(r"\s*>=\s*\d+(\.[\dx*]+)*\s*", engines_node):
        return major >= numbers[0]
    return True  # a range too rich to judge here; npm decides during the build


def check_code_server(ctx: BuildContext, version: str) -> None:
    """The registry has this code-server, and it runs on the spec's Node.js major."""
    spec = ctx.spec
    registry = spec.npm_registry
    try:
        code_server = _json(ctx, f"{registry}/code-server/{version}")
    except FileNotFoundError:
        raise InvalidInput(
            f"{spec.path}: code_server.version {version} does not exist in {registry}",
            hint="see the available versions with: npm view code-server versions",
        ) from None
    engines = str(code_server.get("engines", {}).get("node", ""))
    if engines and not engines_allow(engines, spec.node_major):
        raise InvalidInput(
            f"{spec.path}: code_server.version {version} needs Node.js "
            f"'{engines}', but node.major is {spec.node_major}",
            hint="set node.major to a version code-server supports",
        )


def release_date(mirror: str, suite: str, ca_bundle: Path | None) -> int:
    """The Date of a suite's Release file, in Unix seconds."""
    body = fetch(f"{mirror.rstrip('/')}/dists/{suite}/Release", ca_bundle, "*/*")
    found = re.search(rb"^Date: (.+)$", body, re.MULTILINE)
    if found is None:
        raise RegistryUnreachable(f"{mirror} dists/{suite}/Release has no Date field")
    return int(email.utils.parsedate_to_datetime(found.group(1).decode()).timestamp())


def _suites(spec: ImageSpec) -> list[tuple[str, str, str]]:
    """(spec key, mirror, suite) of every suite a build installs from."""
    return [
        ("debian.mirror", spec.mirror, spec.suite),
        ("debian.mirror", spec.mirror, f"{spec.suite}-updates"),
        ("debian.security_mirror", spec.security_mirror, f"{spec.suite}-security"),
    ]


def _no_suite(spec: ImageSpec, key: str, mirror: str, suite: str) -> InvalidInput:
    return InvalidInput(f"{spec.path}: {key} {mirror} has no suite '{suite}'")


def archive_epoch(spec: ImageSpec, ca_bundle: Path | None) -> int:
    """The archive state the build installs from, as a time: the newest of the suite's
    Release dates. It is the build's SOURCE_DATE_EPOCH, so the same archive state gives
    the same image, and a clock never enters it."""
    dates = []
    for key, mirror, suite in _suites(spec):
        try:
            dates.append(release_date(mirror, suite, ca_bundle))
        except FileNotFoundError:
            raise _no_suite(spec, key, mirror, suite) from None
    return max(dates)


def _npm_name(spec: ImageSpec, package: str) -> str:
    return f"node-linux-{ARCHITECTURES[spec.architecture].node}" if package == "node" else package


def registry_integrity(spec: ImageSpec, package: str, version: str, ca_bundle: Path | None) -> str:
    """The registry's sha512 integrity of one published version (npm never changes it)."""
    name = _npm_name(spec, package)
    url = f"{spec.npm_registry}/{name}/{version}"
    try:
        body = json.loads(fetch(url, ca_bundle))
    except FileNotFoundError:
        raise InvalidInput(f"{spec.npm_registry} has no {name} {version}") from None
    except ValueError:
        raise RegistryUnreachable(f"{url} did not answer with JSON") from None
    integrity = str(body.get("dist", {}).get("integrity", ""))
    if not integrity.startswith("sha512-"):
        raise RegistryUnreachable(f"{url} gives no sha512 integrity for {name} {version}")
    return integrity


def snapshot_hint(lock: Lock) -> str:
    stamp = dt.datetime.fromtimestamp(lock.source_date_epoch, dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return (
        "build from the archive as it was when the lock was made: in the spec, set "
        f'debian.mirror = "https://snapshot.debian.org/archive/debian/{stamp}/" and '
        f'debian.security_mirror = "https://snapshot.debian.org/archive/debian-security/{stamp}/"'
        "; or update the lock with: rockpool image lock SPEC"
    )


def check_lock(ctx: BuildContext, lock: Lock) -> None:
    """Every locked version is still to be had, before any slow work starts."""
    spec = ctx.spec
    available: dict[str, set[str]] = {}
    for key, mirror, suite in _suites(spec):
        url = f"{mirror.rstrip('/')}/dists/{suite}/main/binary-{spec.architecture}/Packages.xz"
        try:
            index = lzma.decompress(fetch(url, ctx.ca_bundle, "*/*"))
        except FileNotFoundError:
            raise _no_suite(spec, key, mirror, suite) from None
        except lzma.LZMAError:
            raise RegistryUnreachable(f"{url} is not an xz-compressed Packages index") from None
        for name, versions in parse_packages_index(index).items():
            available.setdefault(name, set()).update(versions)
    missing = unavailable(lock, available)
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise InvalidInput(
            f"{lock.path.name}: {len(missing)} locked Debian package versions are no longer "
            f"in {spec.mirror} or {spec.security_mirror}: {shown}",
            hint=snapshot_hint(lock),
        )
    for package, record in lock.npm.items():
        integrity = registry_integrity(spec, package, record["version"], ctx.ca_bundle)
        if integrity != record["integrity"]:
            raise InvalidInput(
                f"{lock.path.name}: {_npm_name(spec, package)} {record['version']} in "
                f"{spec.npm_registry} has integrity {integrity[:20]}..., the lock has "
                f"{record['integrity'][:20]}...",
                hint="the registry serves other bytes than were locked; check the registry "
                "setting, or update the lock with: rockpool image lock SPEC",
            )


def preflight(ctx: BuildContext) -> None:
    spec = ctx.spec
    if ctx.lock is not None:
        check_lock(ctx, ctx.lock)
    registry = spec.npm_registry
    if spec.code_server_version is not None:
        check_code_server(ctx, spec.code_server_version)
    node_package = f"node-linux-{ARCHITECTURES[spec.architecture].node}"
    abbreviated = "application/vnd.npm.install-v1+json"
    try:
        versions = _json(ctx, f"{registry}/{node_package}", abbreviated).get("versions", {})
    except FileNotFoundError:
        versions = {}
    if not any(re.fullmatch(rf"{spec.node_major}\.\d+\.\d+", v) for v in versions):
        raise InvalidInput(
            f"{spec.path}: node.major {spec.node_major}: {registry} has no {node_package} "
            f"release of that major"
        )

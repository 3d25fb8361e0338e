"""Stage: check, in seconds, what would otherwise fail minutes into a build.

The Debian mirror must carry the suite, and the npm registry must have the pinned
code-server (for this Node.js major) and a Node.js build of that major.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from rockpool.context import BuildContext
from rockpool.errors import ExitCode, InvalidInput, RockpoolError
from rockpool.spec import ImageSpec

log = logging.getLogger("rockpool.preflight")
TIMEOUT = 30
NODE_ARCH = {"amd64": "x64", "arm64": "arm64"}


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


def archive_epoch(spec: ImageSpec, ca_bundle: Path | None) -> int:
    """The archive state the build installs from, as a time: the newest of the suite's
    Release dates. It is the build's SOURCE_DATE_EPOCH, so the same archive state gives
    the same image, and a clock never enters it."""
    try:
        dates = [release_date(spec.mirror, spec.suite, ca_bundle)]
    except FileNotFoundError:
        raise InvalidInput(
            f"{spec.path}: debian.mirror {spec.mirror} has no suite '{spec.suite}'"
        ) from None
    for mirror, suite in (
        (spec.mirror, f"{spec.suite}-updates"),
        (spec.security_mirror, f"{spec.suite}-security"),
    ):
        try:
            dates.append(release_date(mirror, suite, ca_bundle))
        except FileNotFoundError:
            raise InvalidInput(f"{spec.path}: {mirror} has no suite '{suite}'") from None
    return max(dates)


def preflight(ctx: BuildContext) -> None:
    spec = ctx.spec
    registry = spec.npm_registry
    if spec.code_server_version is not None:
        check_code_server(ctx, spec.code_server_version)
    node_package = f"node-linux-{NODE_ARCH[spec.architecture]}"
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

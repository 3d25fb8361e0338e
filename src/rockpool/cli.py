"""The rockpool command line. Exit codes are documented in docs/cli.md."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import rockpool
from rockpool import host
from rockpool.carrier import write_carrier
from rockpool.errors import ExitCode, Interrupted, InvalidInput, RockpoolError
from rockpool.progress import Reporter
from rockpool.spec import DEFAULT_SPEC, default_spec_path, load_spec
from rockpool.store import Store, Version
from rockpool.units import format_size

Handler = Callable[[argparse.Namespace, Reporter], Any]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as InvalidInput (exit 2, one message)."""

    def error(self, message: str) -> Any:
        raise InvalidInput(f"{self.prog}: {message}", hint=f"see: {self.prog} --help")


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(text)


# ---- image ------------------------------------------------------------------------------


def cmd_image_build(args: argparse.Namespace, reporter: Reporter) -> int:
    from rockpool.pipeline import build

    spec = load_spec(Path(args.spec) if args.spec else default_spec_path())
    store = Store.default()
    result = build(
        spec,
        store,
        reporter,
        force=args.force,
        ca_bundle=Path(args.ca_bundle) if args.ca_bundle else None,
    )
    _emit(args, result.to_json(), result.version.ref)
    return 0


def _version_summary(version: Version, latest: str | None) -> dict[str, Any]:
    manifest = version.manifest
    return {
        "image": version.ref,
        "name": version.name,
        "version": version.id,
        "latest": version.id == latest,
        "created": manifest.get("created"),
        "architecture": manifest.get("architecture"),
        "formats": sorted(manifest.get("outputs", {})),
        "path": str(version.path),
    }


def cmd_image_ls(args: argparse.Namespace, reporter: Reporter) -> int:
    store = Store.default()
    names = [args.name] if args.name else store.image_names()
    rows = []
    for name in names:
        latest = store.latest_id(name)
        rows += [_version_summary(v, latest) for v in reversed(store.versions(name))]
    lines = [f"{'IMAGE':<30} {'CREATED':<26} {'ARCH':<6} FORMATS"]
    for row in rows:
        tag = " (latest)" if row["latest"] else ""
        lines.append(
            f"{row['image'] + tag:<30} {row['created'] or '':<26} "
            f"{row['architecture'] or '':<6} {','.join(row['formats'])}"
        )
    if not rows:
        lines = [f"no images in {store.root}; build one with: rockpool image build"]
    _emit(args, rows, "\n".join(lines))
    return 0


def cmd_image_inspect(args: argparse.Namespace, reporter: Reporter) -> int:
    version = Store.default().resolve(args.ref)
    manifest = {**version.manifest, "path": str(version.path)}
    outputs = manifest.get("outputs", {})
    text = [
        f"{version.ref}  created {manifest.get('created')}  from {manifest['spec']['path']}",
        f"  architecture {manifest.get('architecture')}, Debian {manifest.get('suite')}, "
        f"kernel {manifest.get('kernel')}",
        f"  built in {manifest.get('build_seconds')}s: "
        + ", ".join(f"{k} {v}s" for k, v in manifest.get("stage_seconds", {}).items()),
    ]
    for name, entry in outputs.items():
        text.append(
            f"  {name:<6} {entry['file']:<12} {format_size(entry['size'])} "
            f"({format_size(entry['allocated'])} on disk) sha256:{entry['sha256']}"
        )
    npm = manifest.get("packages", {}).get("npm", {})
    text.append(
        "  "
        + ", ".join(f"{k} {v}" for k, v in npm.items())
        + f", {len(manifest.get('packages', {}).get('debian', {}))} Debian packages"
    )
    _emit(args, manifest, "\n".join(text))
    return 0


# ---- spec, config disk, host ------------------------------------------------------------


def cmd_spec_check(args: argparse.Namespace, reporter: Reporter) -> int:
    spec = load_spec(Path(args.spec) if args.spec else default_spec_path())
    _emit(
        args,
        spec.to_json(),
        f"{spec.path}: valid ({spec.name}, {spec.suite}, "
        f"{spec.architecture}, {format_size(spec.disk_size)}, {len(spec.packages)} packages)",
    )
    return 0


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidInput(f"--env takes KEY=VALUE, not '{pair}'")
        env[key] = value
    return env


def cmd_config_disk(args: argparse.Namespace, reporter: Reporter) -> int:
    env = {"ROCKPOOL_WORKSPACE_NAME": args.name, **_parse_env(args.env)}
    keys = None
    if args.authorized_keys:
        try:
            keys = Path(args.authorized_keys).read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidInput(f"cannot read --authorized-keys: {exc}") from None
    path = write_carrier(Path(args.path), env, keys)
    _emit(args, {"path": str(path.resolve()), "env": env}, str(path))
    return 0


def cmd_host_setup(args: argparse.Namespace, reporter: Reporter) -> int:
    packages = host.packages(with_tests=args.with_tests)
    with reporter.stage("installing host packages"):
        host.install_packages(packages)
    _emit(args, {"installed": packages}, "host tools installed: " + " ".join(packages))
    return 0


def cmd_host_check(args: argparse.Namespace, reporter: Reporter) -> int:
    missing = host.missing_tools({**host.BUILD_TOOLS, **host.RUN_TOOLS})
    data = {"missing": missing, "ok": not missing}
    text = (
        "all host tools present"
        if not missing
        else "missing: "
        + ", ".join(f"{tool} (apt-get install {pkg})" for tool, pkg in missing.items())
    )
    _emit(args, data, text)
    return 0 if not missing else int(ExitCode.MISSING_TOOL)


# ---- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    json_flag = _Parser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser = _Parser(prog="rockpool", description="Build, store and run Rockpool workspace images.")
    parser.add_argument("--version", action="version", version=f"rockpool {rockpool.__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    groups = parser.add_subparsers(dest="group", required=True, parser_class=_Parser)

    image = groups.add_parser("image", help="build and inspect images").add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )
    p = image.add_parser("build", parents=[json_flag], help="build an image from a spec")
    p.add_argument("spec", nargs="?", help=f"default: {DEFAULT_SPEC}")
    p.add_argument("--force", action="store_true", help="rebuild even if the inputs are unchanged")
    p.add_argument("--ca-bundle", help="CA bundle for registries (default: the host's)")
    p.set_defaults(handler=cmd_image_build)
    p = image.add_parser("ls", parents=[json_flag], help="list stored image versions")
    p.add_argument("name", nargs="?")
    p.set_defaults(handler=cmd_image_ls)
    p = image.add_parser("inspect", parents=[json_flag], help="show one version's manifest")
    p.add_argument("ref", help="NAME, NAME:latest or NAME:VERSION")
    p.set_defaults(handler=cmd_image_inspect)

    spec = groups.add_parser("spec", help="image specs").add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )
    p = spec.add_parser("check", parents=[json_flag], help="validate a spec and show it resolved")
    p.add_argument("spec", nargs="?", help=f"default: {DEFAULT_SPEC}")
    p.set_defaults(handler=cmd_spec_check)

    p = groups.add_parser(
        "config-disk",
        parents=[json_flag],
        help="write a workspace config disk (the init contract's carrier)",
    )
    p.add_argument("path")
    p.add_argument("--name", required=True, help="ROCKPOOL_WORKSPACE_NAME")
    p.add_argument("--env", action="append", default=[], metavar="ROCKPOOL_KEY=VALUE")
    p.add_argument("--authorized-keys", metavar="FILE")
    p.set_defaults(handler=cmd_config_disk)

    hosts = groups.add_parser("host", help="this machine's tools").add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )
    p = hosts.add_parser("setup", parents=[json_flag], help="install the host tools (apt)")
    p.add_argument("--with-tests", action="store_true", help="also what the test suite needs")
    p.set_defaults(handler=cmd_host_setup)
    p = hosts.add_parser("check", parents=[json_flag], help="list missing host tools")
    p.set_defaults(handler=cmd_host_check)
    return parser


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"stopped by signal {signal.Signals(signum).name}")


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    wants_json = "--json" in args_list
    package_logger = logging.getLogger("rockpool")
    package_logger.propagate = False  # logs go to build logs only, never as tracebacks
    if not package_logger.handlers:
        package_logger.addHandler(logging.NullHandler())
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGHUP, _raise_interrupted)
    try:
        args = build_parser().parse_args(args_list)
        with Reporter(quiet=args.quiet) as reporter:
            return int(args.handler(args, reporter))
    except BrokenPipeError:
        # The reader went away (`rockpool image ls | head`): stop quietly, as shells do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.BROKEN_PIPE)
    except KeyboardInterrupt:
        return _fail(Interrupted("interrupted; nothing partial was kept"), wants_json)
    except RockpoolError as exc:
        return _fail(exc, wants_json)
    except Exception as exc:  # a bug: say so plainly, keep the traceback for the log
        if os.environ.get("ROCKPOOL_DEBUG"):
            raise
        logging.getLogger("rockpool").exception("internal error")
        error = RockpoolError(
            f"internal error: {type(exc).__name__}: {exc}",
            hint="set ROCKPOOL_DEBUG=1 to see the traceback, and report it",
        )
        return _fail(error, wants_json)


def _fail(error: RockpoolError, wants_json: bool) -> int:
    if wants_json:
        payload = {
            "error": {
                "message": error.message,
                "hint": error.hint,
                "exit_code": int(error.exit_code),
                "kind": type(error).__name__,
            }
        }
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
    print(f"rockpool: error: {error}", file=sys.stderr)
    return int(error.exit_code)

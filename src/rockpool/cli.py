"""The rockpool command line. Exit codes are documented in docs/cli.md."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import rockpool
from rockpool import host, tools
from rockpool import runtime as runtimes
from rockpool.config_disk import make_config_disk
from rockpool.errors import (
    FREE_SPACE_HINT,
    ExitCode,
    Interrupted,
    InvalidInput,
    RockpoolError,
    Terminated,
)
from rockpool.files import NotRegularFile, TooLarge, read_regular
from rockpool.keys import KEYS_LIMIT, check_authorized_keys
from rockpool.progress import Reporter
from rockpool.runtime.base import PortForward, Runtime, Workspace
from rockpool.spec import (
    DEFAULT_SPEC,
    PACKAGE_REFERENCE,
    default_spec_path,
    init_variant,
    load_spec,
)
from rockpool.store import Store, Version
from rockpool.units import format_size

Handler = Callable[[argparse.Namespace, Reporter], Any]
DEFAULT_SPEC_HELP = (
    f"default: ./{DEFAULT_SPEC} if there is one here, "
    f"else the packaged {PACKAGE_REFERENCE}{DEFAULT_SPEC.name}"
)


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
    from rockpool.build.runner import build

    spec = load_spec(Path(args.spec) if args.spec else default_spec_path())
    store = Store.default()
    if args.builder == "packer" and args.until:
        raise InvalidInput("--until needs the mmdebstrap builder (Packer runs as one step)")
    if args.builder == "packer":
        from rockpool.build.packer import DEFAULT_BASE_VM, build_with_packer

        result = build_with_packer(
            spec, store, reporter, force=args.force, base_vm=args.packer_base or DEFAULT_BASE_VM
        )
    else:
        if args.packer_base:
            raise InvalidInput("--packer-base needs --builder packer")
        result = build(
            spec,
            store,
            reporter,
            force=args.force,
            ca_bundle=Path(args.ca_bundle) if args.ca_bundle else None,
            use_lock=not args.no_lock,
            until=args.until,
            verify=not args.no_verify,
        )
    if result.version is None:
        _emit(args, result.to_json(), f"{spec.name}: stopped after {result.stopped_after}")
    else:
        _emit(args, result.to_json(), result.version.ref)
    return 0


def cmd_image_lock(args: argparse.Namespace, reporter: Reporter) -> int:
    from rockpool.build.locking import lock_spec

    spec = load_spec(Path(args.spec) if args.spec else default_spec_path())
    path, result = lock_spec(
        spec,
        Store.default(),
        reporter,
        ca_bundle=Path(args.ca_bundle) if args.ca_bundle else None,
    )
    _emit(
        args,
        {"lock": str(path), "architecture": spec.architecture, **result.to_json()},
        f"wrote {path} ({spec.architecture}) from {result.landed.ref}",
    )
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
        for problem in store.damaged(name):
            reporter.warn(str(problem))
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


def cmd_image_push(args: argparse.Namespace, reporter: Reporter) -> int:
    from rockpool.push import push

    store = Store.default()
    version = store.resolve(args.ref)
    reference = push(
        version,
        args.destination,
        store,
        reporter,
        insecure=args.insecure,
        nvram=Path(args.nvram) if args.nvram else None,
    )
    _emit(args, {"image": version.ref, "pushed": reference}, reference)
    return 0


def cmd_image_install(args: argparse.Namespace, reporter: Reporter) -> int:
    store = Store.default()
    version = store.resolve(args.ref)
    runtime = _runtime(args, store)
    with reporter.stage(f"installing {version.ref} into {runtime.title}"):
        installed = runtime.install_image(version)
    _emit(
        args,
        {"image": version.ref, "runtime": runtime.name, "installed": installed, "vm": installed},
        installed,
    )
    return 0


def cmd_image_inspect(args: argparse.Namespace, reporter: Reporter) -> int:
    version = Store.default().resolve(args.ref)
    manifest = {**version.manifest, "path": str(version.path)}
    outputs = manifest.get("outputs", {})
    text = [
        f"{version.ref}  created {manifest.get('created')}  "
        f"from {manifest.get('spec', {}).get('path', '?')}",
        f"  architecture {manifest.get('architecture')}, Debian {manifest.get('suite')}, "
        f"kernel {manifest.get('kernel')}",
        f"  built in {manifest.get('build_seconds')}s: "
        + ", ".join(f"{k} {v}s" for k, v in manifest.get("stage_seconds", {}).items()),
    ]
    for name, entry in outputs.items():
        text.append(
            f"  {name:<6} {entry['file']:<12} {format_size(entry.get('size', 0))} "
            f"({format_size(entry.get('allocated', 0))} on disk) "
            f"sha256:{entry.get('sha256', '?')}"
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


def cmd_spec_init(args: argparse.Namespace, reporter: Reporter) -> int:
    written = init_variant(Path(args.file), arm64=args.arm64, force=args.force)
    _emit(args, written, args.file)
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
    path = make_config_disk(Path(args.path), env, _read_keys(args.authorized_keys))
    _emit(args, {"path": str(path.resolve()), "env": env}, str(path))
    return 0


def cmd_host_setup(args: argparse.Namespace, reporter: Reporter) -> int:
    packages = tools.all_packages(with_tests=args.with_tests)
    with reporter.stage("installing host packages"):
        host.install_packages(packages)
    with reporter.stage("enabling foreign architectures (binfmt_misc, qemu-user)"):
        host.enable_foreign_architectures()
    _emit(args, {"installed": packages}, "host tools installed: " + " ".join(packages))
    return 0


# ---- workspaces -------------------------------------------------------------------------


def _workspace_line(workspace: Workspace) -> str:
    where = f"  {workspace.endpoint.url}" if workspace.endpoint else ""
    return f"{workspace.name:<24} {workspace.state.value:<8} {workspace.image}{where}"


def _read_keys(path: str | None) -> str | None:
    if not path:
        return None
    try:
        data = read_regular(path, KEYS_LIMIT)
    except NotRegularFile:
        raise InvalidInput(f"--authorized-keys {path} is not a regular file") from None
    except TooLarge:
        raise InvalidInput(
            f"--authorized-keys {path} is over {KEYS_LIMIT >> 10} KiB",
            hint="give public keys only, one per line",
        ) from None
    except OSError as exc:
        raise InvalidInput(f"cannot read --authorized-keys {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(
            f"--authorized-keys {path} is not text: give public keys, one per line"
        ) from None
    return check_authorized_keys(text, f"--authorized-keys {path}")


def _runtime(args: argparse.Namespace, store: Store) -> Runtime:
    """The runtime --runtime names, with the runtime options given (Incus's placement)."""
    options = {key: getattr(args, key, None) for key in RUNTIME_OPTIONS}
    return runtimes.get(args.runtime, store, **options)


def cmd_workspace(args: argparse.Namespace, reporter: Reporter) -> int:
    runtime = _runtime(args, Store.default())
    verb = args.command
    if verb == "ls":
        for problem in runtime.damaged():
            reporter.warn(str(problem))
        workspaces = runtime.list()
        _emit(
            args,
            [w.to_json() for w in workspaces],
            "\n".join(_workspace_line(w) for w in workspaces) or "no workspaces",
        )
        return 0
    if verb == "rm":
        runtime.remove(args.name, force=args.force)
        _emit(args, {"removed": args.name}, f"removed {args.name}")
        return 0
    if verb == "create":
        workspace = runtime.create(args.name, args.image or runtime.default_image)
    elif verb == "start":
        env, keys = _parse_env(args.env), _read_keys(args.authorized_keys)  # checked first
        with reporter.stage(f"starting {args.name}"):
            workspace = runtime.start(args.name, env, keys)
    elif verb == "stop":
        with reporter.stage(f"stopping {args.name}"):
            workspace = runtime.stop(args.name, timeout=args.timeout, suspend=args.suspend)
    elif verb == "clone":
        workspace = runtime.clone(args.source, args.name)
    else:
        workspace = runtime.status(args.name)
    _emit(args, workspace.to_json(), _workspace_line(workspace))
    return 0


def _port_line(port: PortForward) -> str:
    where = f"{port.host}:{port.host_port}" if port.host_port else "(when it runs)"
    return f"{port.guest_port:<8} {where}"


def cmd_workspace_port(args: argparse.Namespace, reporter: Reporter) -> int:
    runtime = _runtime(args, Store.default())
    if args.command == "add":
        port = runtime.add_port(args.name, args.guest_port)
        _emit(args, port.to_json(), _port_line(port))
    elif args.command == "rm":
        runtime.remove_port(args.name, args.guest_port)
        _emit(args, {"removed": args.guest_port}, f"removed port {args.guest_port}")
    else:
        ports = runtime.ports(args.name)
        _emit_list(args, [p.to_json() for p in ports], [_port_line(p) for p in ports], "no ports")
    return 0


def _emit_list(
    args: argparse.Namespace, data: list[dict[str, Any]], lines: list[str], empty: str
) -> None:
    _emit(args, data, "\n".join(lines) or empty)


def cmd_workspace_snapshot(args: argparse.Namespace, reporter: Reporter) -> int:
    runtime = _runtime(args, Store.default())
    if args.command == "create":
        snapshot = runtime.snapshot(args.name, args.snapshot)
        _emit(args, snapshot.to_json(), f"{args.name}/{snapshot.name} {snapshot.created}")
    elif args.command == "restore":
        with reporter.stage(f"restoring {args.name} to {args.snapshot}"):
            workspace = runtime.restore(args.name, args.snapshot)
        _emit(args, workspace.to_json(), _workspace_line(workspace))
    elif args.command == "rm":
        runtime.remove_snapshot(args.name, args.snapshot)
        _emit(args, {"removed": args.snapshot}, f"removed {args.name}/{args.snapshot}")
    else:
        snapshots = runtime.snapshots(args.name)
        lines = [f"{s.name} {s.created}" for s in snapshots]
        _emit_list(args, [s.to_json() for s in snapshots], lines, "no snapshots")
    return 0


def cmd_image_rm(args: argparse.Namespace, reporter: Reporter) -> int:
    from rockpool.gc import remove_image

    removed = remove_image(Store.default(), args.ref)
    _emit(args, {"removed": removed}, f"removed {removed}")
    return 0


def cmd_image_diff(args: argparse.Namespace, reporter: Reporter) -> int:
    from rockpool.diff import diff_versions, render

    store = Store.default()
    result = diff_versions(store.resolve(args.a), store.resolve(args.b), bytes_of_disks=args.bytes)
    _emit(args, result, render(result))
    return 0


def cmd_image_verify(args: argparse.Namespace, reporter: Reporter) -> int:
    from rockpool.reproduce import render_verification, verify_version

    result = verify_version(Store.default(), args.ref, reporter)
    _emit(args, result, render_verification(result))
    return ExitCode.OK if result["identical"] else ExitCode.NOT_REPRODUCED


# ---- cache ------------------------------------------------------------------------------


def cmd_cache_ls(args: argparse.Namespace, reporter: Reporter) -> int:
    from rockpool.build.cache import StageCache

    entries = StageCache.of_store(Store.default().root).entries()
    rows = [entry.to_json() for entry in entries]
    total = sum(row["allocated"] for row in rows)
    lines = [
        f"{row['stage']:<10} {row['key'][:16]}  {format_size(row['allocated']):>10}  "
        + (f"DAMAGED ({row['damaged']})" if row["damaged"] else f"last used {row['last_used']}")
        for row in rows
    ]
    damaged = sum(1 for row in rows if row["damaged"])
    if damaged:
        reporter.warn(
            f"{damaged} damaged cache entries: a build that needs one rebuilds it; "
            "rockpool cache prune removes them"
        )
    lines.append(f"{len(rows)} entries, {format_size(total)}")
    _emit(args, {"entries": rows, "allocated": total}, "\n".join(lines))
    return 0


def cmd_cache_prune(args: argparse.Namespace, reporter: Reporter) -> int:
    from rockpool.build.cache import StageCache, configured_max_bytes, parse_max_size

    limit = parse_max_size(args.max_size) if args.max_size is not None else configured_max_bytes()
    if args.all:
        limit = 0
    removed = StageCache.of_store(Store.default().root).prune(limit, stage=args.stage)
    rows = [{"stage": e.stage, "key": e.key} for e in removed]
    text = "\n".join(f"removed {r['stage']} {r['key'][:16]}" for r in rows) or "nothing to remove"
    _emit(args, {"removed": rows, "max_bytes": limit}, text)
    return 0


def cmd_image_gc(args: argparse.Namespace, reporter: Reporter) -> int:
    """Remove every version that is neither an image's latest nor held by a workspace."""
    from rockpool.gc import collect

    result = collect(Store.default())
    for warning in result.warnings:
        reporter.warn(warning)
    lines = [f"removed {r}" for r in result.removed] + [
        f"kept {k['image']}"
        + (" (latest)" if k["latest"] else "")
        + (f" held by {', '.join(k['held_by'])}" if k["held_by"] else "")
        for k in result.kept
    ]
    _emit(args, result.to_json(), "\n".join(lines) or "nothing to remove")
    return 0


def cmd_host_check(args: argparse.Namespace, reporter: Reporter) -> int:
    jobs = host.check(with_tests=args.with_tests)
    ok = all(job["ok"] for job in jobs.values())
    lines = []
    for name, job in jobs.items():
        problems = [f"{program} ({package})" for program, package in job["missing"].items()]
        problems += [job[key] for key in ("foreign_architecture", "firmware") if key in job]
        lines.append(f"{name:<16} " + ("ok" if job["ok"] else "missing: " + "; ".join(problems)))
    absent = sorted({p for job in jobs.values() for p in job["missing"]})
    if not ok:
        lines.append(tools.install_hint(absent) if absent else "run: sudo rockpool host setup")
    _emit(args, {"jobs": jobs, "ok": ok}, "\n".join(lines))
    return 0 if ok else int(ExitCode.MISSING_TOOL)


# ---- parser -----------------------------------------------------------------------------


def _guest_port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, not '{text}'")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds >= 0")
    return value


RUNTIME_OPTIONS = ("remote", "project", "target", "instance_type")


def _add_incus_server(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--remote", help="incus: the client's remote (default: $ROCKPOOL_INCUS_REMOTE, else local)"
    )
    parser.add_argument(
        "--project", help="incus: the project (default: $ROCKPOOL_INCUS_PROJECT, else default)"
    )


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
    p.add_argument("spec", nargs="?", help=DEFAULT_SPEC_HELP)
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild every stage, ignoring the stored version and the stage cache",
    )
    p.add_argument(
        "--no-lock",
        action="store_true",
        help="ignore the spec's lock file: resolve against today's archive and registry",
    )
    p.add_argument("--ca-bundle", help="CA bundle for registries (default: the host's)")
    p.add_argument(
        "--builder",
        choices=["mmdebstrap", "packer"],
        default="mmdebstrap",
        help="mmdebstrap (Linux, default) or packer (macOS: Packer's tart-cli builder)",
    )
    p.add_argument(
        "--packer-base", metavar="IMAGE", help="the Tart VM or OCI image Packer starts from"
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="land the image without booting it first (latest moves to it unchecked)",
    )
    p.add_argument(
        "--until",
        choices=["preflight", "bootstrap", "provision", "disk"],
        help="stop after this stage: its result stays in the stage cache, nothing lands",
    )
    p.set_defaults(handler=cmd_image_build)
    p = image.add_parser(
        "lock",
        parents=[json_flag],
        help="resolve a spec to exact package versions and write its lock file beside it",
    )
    p.add_argument("spec", nargs="?", help=DEFAULT_SPEC_HELP)
    p.add_argument("--ca-bundle", help="CA bundle for registries (default: the host's)")
    p.set_defaults(handler=cmd_image_lock)
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
    p.add_argument("spec", nargs="?", help=DEFAULT_SPEC_HELP)
    p.set_defaults(handler=cmd_spec_check)
    p = spec.add_parser(
        "init",
        parents=[json_flag],
        help=f"write a variant spec that extends the packaged {DEFAULT_SPEC.name}, to start from",
    )
    p.add_argument("file", metavar="FILE", help="the spec to write, e.g. my.toml")
    p.add_argument("--arm64", action="store_true", help="extend the arm64 spec (Tart) instead")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(handler=cmd_spec_init)

    p = groups.add_parser(
        "config-disk",
        parents=[json_flag],
        help="write a workspace config disk (the init contract's config disk)",
    )
    p.add_argument("path")
    p.add_argument("--name", required=True, help="ROCKPOOL_WORKSPACE_NAME")
    p.add_argument("--env", action="append", default=[], metavar="ROCKPOOL_KEY=VALUE")
    p.add_argument("--authorized-keys", metavar="FILE")
    p.set_defaults(handler=cmd_config_disk)

    p = image.add_parser(
        "push", parents=[json_flag], help="copy a version's Tart OCI image to a registry"
    )
    p.add_argument("ref", help="NAME, NAME:latest or NAME:VERSION (built with the tart-oci format)")
    p.add_argument("destination", help="HOST[:PORT]/REPOSITORY[:TAG] (tag default: the version)")
    p.add_argument(
        "--insecure", action="store_true", help="plain HTTP / unverified TLS (local registries)"
    )
    p.add_argument(
        "--nvram",
        metavar="FILE",
        help="nvram.bin for Tart's nvram layer (default on macOS: made by tart create --linux)",
    )
    p.set_defaults(handler=cmd_image_push)
    p = image.add_parser(
        "install",
        parents=[json_flag],
        help="make a version a local Tart VM (macOS), or Incus images",
    )
    p.add_argument(
        "ref", help="NAME, NAME:latest or NAME:VERSION (built with the tart or incus formats)"
    )
    p.add_argument(
        "--runtime",
        choices=runtimes.installers(),
        required=True,
        help="tart: tart create --linux, then the built disk and config; incus: import the "
        "incus and incus-container forms, aliased NAME/VERSION and NAME/latest (QEMU needs "
        "no install)",
    )
    _add_incus_server(p)
    p.set_defaults(handler=cmd_image_install)
    p = image.add_parser("rm", parents=[json_flag], help="remove a version no workspace uses")
    p.add_argument("ref", help="NAME:VERSION or NAME (its latest)")
    p.set_defaults(handler=cmd_image_rm)
    p = image.add_parser(
        "gc",
        parents=[json_flag],
        help="remove versions that are not latest and not used by a workspace",
    )
    p.set_defaults(handler=cmd_image_gc)
    p = image.add_parser(
        "diff", parents=[json_flag], help="what differs between two versions (files, packages)"
    )
    p.add_argument("a", help="NAME:VERSION (or NAME for its latest)")
    p.add_argument("b", help="NAME:VERSION (or NAME for its latest)")
    p.add_argument(
        "--bytes", action="store_true", help="also compare the raw disks and name the regions"
    )
    p.set_defaults(handler=cmd_image_diff)
    p = image.add_parser(
        "verify",
        parents=[json_flag],
        help="rebuild a version from its recorded inputs here; exit 8 if the bytes differ",
    )
    p.add_argument("ref", help="NAME:VERSION (or NAME for its latest)")
    p.set_defaults(handler=cmd_image_verify)

    caches = groups.add_parser("cache", help="the stage cache of builds").add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )
    p = caches.add_parser("ls", parents=[json_flag], help="list cache entries")
    p.set_defaults(handler=cmd_cache_ls)
    p = caches.add_parser(
        "prune", parents=[json_flag], help="remove least recently used entries over a size"
    )
    p.add_argument(
        "--max-size",
        metavar="SIZE",
        help="keep at most SIZE, e.g. 20G (default: $ROCKPOOL_CACHE_MAX_SIZE, else 40G)",
    )
    p.add_argument("--all", action="store_true", help="remove every entry")
    p.add_argument(
        "--stage",
        choices=["bootstrap", "provision", "disk", "formats"],
        help="only entries of this stage",
    )
    p.set_defaults(handler=cmd_cache_prune)

    spaces = groups.add_parser(
        "workspace", help="workspaces on QEMU, Tart or Incus"
    ).add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = spaces.add_parser("create", parents=[json_flag], help="create a workspace from an image")
    p.add_argument("name")
    p.add_argument("--target", help="incus: the cluster member (default: Incus places it)")
    p.add_argument(
        "--type",
        dest="instance_type",
        choices=("vm", "container"),
        help="incus: a VM or a system container (default: a VM where the server runs VMs)",
    )
    defaults = (runtimes.runtime_class(name) for name in runtimes.names())
    p.add_argument(
        "--image",
        help="NAME[:VERSION] (default: "
        + ", ".join(f"{runtime.default_image} on {runtime.title}" for runtime in defaults)
        + ")",
    )
    p = spaces.add_parser("start", parents=[json_flag], help="start a workspace")
    p.add_argument("name")
    p.add_argument("--env", action="append", default=[], metavar="ROCKPOOL_KEY=VALUE")
    p.add_argument("--authorized-keys", metavar="FILE", help="SSH keys for the workspace user")
    p = spaces.add_parser("stop", parents=[json_flag], help="power off (ACPI, then hard)")
    p.add_argument("name")
    p.add_argument(
        "--timeout", type=_seconds, default=90.0, help="seconds before a hard stop (default 90)"
    )
    p.add_argument(
        "--suspend",
        action="store_true",
        help="save the running guest's state instead; the next start resumes it (QEMU)",
    )
    p = spaces.add_parser("status", parents=[json_flag], help="state and endpoint")
    p.add_argument("name")
    p = spaces.add_parser("ls", parents=[json_flag], help="list workspaces")
    p = spaces.add_parser("clone", parents=[json_flag], help="clone a stopped workspace")
    p.add_argument("source")
    p.add_argument("name")
    p.add_argument("--target", help="incus: the cluster member of the copy")
    p = spaces.add_parser("rm", parents=[json_flag], help="remove a workspace and its disk")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="kill it first if it is running")
    port_verbs = spaces.add_parser(
        "port", help="dynamic ports: forwards to apps in a workspace"
    ).add_subparsers(dest="command", required=True, parser_class=_Parser)
    for verb, text in (("add", "forward a guest port"), ("rm", "remove a forward")):
        p = port_verbs.add_parser(verb, parents=[json_flag], help=text)
        p.add_argument("name")
        p.add_argument("guest_port", type=_guest_port, metavar="GUEST_PORT")
    p = port_verbs.add_parser("ls", parents=[json_flag], help="list a workspace's ports")
    p.add_argument("name")
    snapshot_verbs = spaces.add_parser(
        "snapshot", help="snapshots of a workspace's disk (Incus)"
    ).add_subparsers(dest="command", required=True, parser_class=_Parser)
    for verb, text in (
        ("create", "save the disk's state under a name"),
        ("restore", "bring the disk back to a snapshot (stops the workspace)"),
        ("rm", "delete a snapshot"),
    ):
        p = snapshot_verbs.add_parser(verb, parents=[json_flag], help=text)
        p.add_argument("name")
        p.add_argument("snapshot")
    p = snapshot_verbs.add_parser("ls", parents=[json_flag], help="list a workspace's snapshots")
    p.add_argument("name")
    runtime_names = " or ".join(runtimes.names())
    for verbs, handler in (
        (port_verbs, cmd_workspace_port),
        (snapshot_verbs, cmd_workspace_snapshot),
    ):
        for verb_parser in verbs.choices.values():
            verb_parser.add_argument("--runtime", choices=runtimes.names(), help=runtime_names)
            _add_incus_server(verb_parser)
            verb_parser.set_defaults(handler=handler)
    for verb, verb_parser in spaces.choices.items():
        if verb in ("port", "snapshot"):
            continue
        verb_parser.add_argument(
            "--runtime",
            choices=runtimes.names(),
            help=f"{runtime_names} (default: $ROCKPOOL_RUNTIME, else tart on macOS, qemu "
            "elsewhere)",
        )
        _add_incus_server(verb_parser)
        verb_parser.set_defaults(handler=cmd_workspace)

    hosts = groups.add_parser("host", help="this machine's tools").add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )
    p = hosts.add_parser("setup", parents=[json_flag], help="install the host tools (apt)")
    p.add_argument("--with-tests", action="store_true", help="also what the test suite needs")
    p.set_defaults(handler=cmd_host_setup)
    p = hosts.add_parser(
        "check", parents=[json_flag], help="what each job (build, workspaces, push) lacks here"
    )
    p.add_argument("--with-tests", action="store_true", help="also what the test suite needs")
    p.set_defaults(handler=cmd_host_check)
    return parser


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # The first signal stops the verb; later ones must not cut its clean-up short.
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _already_stopping)
    raise Terminated(signum)


def _already_stopping(signum: int, frame: FrameType | None) -> None:
    logging.getLogger("rockpool").info("signal %s while cleaning up; still cleaning up", signum)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    wants_json = "--json" in args_list
    package_logger = logging.getLogger("rockpool")
    package_logger.propagate = False  # logs go to build logs only, never as tracebacks
    if not package_logger.handlers:
        package_logger.addHandler(logging.NullHandler())
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _raise_terminated)
    try:
        args = build_parser().parse_args(args_list)
        with Reporter(quiet=args.quiet) as reporter:
            return int(args.handler(args, reporter))
    except BrokenPipeError:
        # The reader went away (`rockpool image ls | head`): stop quietly, as shells do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.BROKEN_PIPE)
    except Terminated as stop:
        name = signal.Signals(stop.signum).name
        interrupted = Interrupted(f"interrupted by {name}: cleaned up, nothing partial was kept")
        interrupted.exit_code = ExitCode(stop.exit_code)
        return _fail(interrupted, wants_json)
    except RockpoolError as exc:
        return _fail(exc, wants_json)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _internal_error(exc, wants_json)
        full = RockpoolError(
            f"no space left on the device{f' writing {exc.filename}' if exc.filename else ''}; "
            "what was under way was cleaned up",
            hint=FREE_SPACE_HINT,
        )
        full.exit_code = ExitCode.COMMAND_FAILED
        return _fail(full, wants_json)
    except Exception as exc:
        return _internal_error(exc, wants_json)


def _internal_error(exc: Exception, wants_json: bool) -> int:
    """A bug: say so plainly, keep the traceback for the log."""
    if os.environ.get("ROCKPOOL_DEBUG"):
        raise exc
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

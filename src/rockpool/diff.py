"""`rockpool image diff A B`: what differs between two stored versions.

Package versions come from the manifests; files from each version's root filesystem
listing (rootfs.LISTING); outputs from their digests. When the files and packages agree
but the disks do not, the byte ranges that differ are mapped to the disk's regions,
which is where a non-reproducible byte hides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rockpool.build.rootfs import LISTING, read_listing
from rockpool.errors import NotFound
from rockpool.store import Version

_BLOCK = 1 << 20
MAX_RANGES = 20


def _changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    return {
        "added": sorted(k for k in new if k not in old),
        "removed": sorted(k for k in old if k not in new),
        "changed": {
            k: {"from": old[k], "to": new[k]} for k in sorted(old) if k in new and old[k] != new[k]
        },
    }


def _listing(version: Version) -> dict[str, dict[str, Any]]:
    path = version.path / LISTING
    if not path.is_file():
        raise NotFound(
            f"{version.ref} has no file listing ({LISTING}); it was built by an older rockpool",
            hint="rebuild it with: rockpool image build --force",
        )
    return read_listing(path)


def _file_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    changes = _changes(old, new)
    # Name the attributes that differ instead of repeating whole records.
    changes["changed"] = {
        path: {
            field: {"from": pair["from"].get(field), "to": pair["to"].get(field)}
            for field in sorted(set(pair["from"]) | set(pair["to"]))
            if pair["from"].get(field) != pair["to"].get(field)
        }
        for path, pair in changes["changed"].items()
    }
    return changes


def _regions(manifest: dict[str, Any]) -> list[tuple[str, int, int]]:
    disk = manifest.get("disk", {})
    esp_start = 1 << 20
    root = int(disk.get("root_offset", 0))
    return [
        ("GPT header", 0, esp_start),
        ("EFI system partition", esp_start, root),
        ("root filesystem", root, root + int(disk.get("root_size", 0))),
        ("backup GPT", root + int(disk.get("root_size", 0)), 1 << 62),
    ]


def differing_ranges(a: Path, b: Path) -> list[tuple[int, int]]:
    """Byte ranges (MiB-aligned) where two disks differ, merged, at most MAX_RANGES."""
    ranges: list[tuple[int, int]] = []
    offset = 0
    with open(a, "rb") as first, open(b, "rb") as second:
        while True:
            left, right = first.read(_BLOCK), second.read(_BLOCK)
            if not left and not right:
                break
            if left != right:
                if ranges and ranges[-1][1] == offset:
                    ranges[-1] = (ranges[-1][0], offset + _BLOCK)
                elif len(ranges) < MAX_RANGES:
                    ranges.append((offset, offset + _BLOCK))
                else:
                    break
            offset += _BLOCK
    return ranges


def diff_versions(a: Version, b: Version, *, bytes_of_disks: bool = False) -> dict[str, Any]:
    ma, mb = a.manifest, b.manifest
    packages = {
        kind: _changes(ma.get("packages", {}).get(kind, {}), mb.get("packages", {}).get(kind, {}))
        for kind in ("debian", "npm")
    }
    outputs = {
        name: {"a": ma["outputs"].get(name, {}).get("sha256"), "b": entry.get("sha256")}
        for name, entry in mb.get("outputs", {}).items()
    } | {
        name: {"a": entry.get("sha256"), "b": None}
        for name, entry in ma.get("outputs", {}).items()
        if name not in mb.get("outputs", {})
    }
    result: dict[str, Any] = {
        "a": a.ref,
        "b": b.ref,
        "identical": a.id == b.id,
        "outputs": {
            name: {**pair, "same": pair["a"] == pair["b"]} for name, pair in outputs.items()
        },
        "packages": packages,
        "files": _file_changes(_listing(a), _listing(b)),
    }
    if bytes_of_disks and "raw" in ma.get("outputs", {}) and "raw" in mb.get("outputs", {}):
        regions = _regions(ma)
        result["disk_bytes"] = [
            {
                "start": start,
                "end": end,
                "region": next((name for name, low, high in regions if low <= start < high), "?"),
            }
            for start, end in differing_ranges(a.output_path("raw"), b.output_path("raw"))
        ]
    return result


def render(diff: dict[str, Any]) -> str:
    lines = [f"{diff['a']} -> {diff['b']}: " + ("identical" if diff["identical"] else "differ")]
    for name, pair in sorted(diff["outputs"].items()):
        lines.append(f"  output {name}: " + ("same" if pair["same"] else "differs"))
    for kind, changes in diff["packages"].items():
        for name in changes["added"]:
            lines.append(f"  + {kind} package {name}")
        for name in changes["removed"]:
            lines.append(f"  - {kind} package {name}")
        for name, pair in changes["changed"].items():
            lines.append(f"  ~ {kind} package {name}: {pair['from']} -> {pair['to']}")
    files = diff["files"]
    lines += [f"  + {path}" for path in files["added"]]
    lines += [f"  - {path}" for path in files["removed"]]
    for path, fields in files["changed"].items():
        shown = ", ".join(f"{f} {v['from']} -> {v['to']}" for f, v in fields.items())
        lines.append(f"  ~ {path}: {shown}")
    for span in diff.get("disk_bytes", []):
        lines.append(f"  disk bytes {span['start']}-{span['end']} differ ({span['region']})")
    return "\n".join(lines)

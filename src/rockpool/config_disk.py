"""The init contract's config disk: a small read-only disk the worker attaches.

A whole-disk FAT filesystem labelled ROCKPOOL holding:
    env              ROCKPOOL_*=value lines (ROCKPOOL_WORKSPACE_NAME is required)
    authorized_keys  optional SSH public keys for the workspace user
Every runtime can attach a raw disk file (Tart: `--disk PATH:ro`, QEMU: a read-only
virtio-blk drive, Incus: a disk device), so one config disk serves them all. The guest's
rockpool-init.service reads it at every boot; see docs/init-contract.md. Values and the
whole env file have size caps (VALUE_LIMIT, ENV_LIMIT), checked here and again in the
guest, so that reading it can never hold up the boot.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

from rockpool import tools
from rockpool.command import clean_environment, run
from rockpool.errors import InvalidInput
from rockpool.names import check_slug, is_instance_id

LABEL = "ROCKPOOL"
VALUE_LIMIT = 4096
"""Bytes of one ROCKPOOL_* value. The guest's rockpool-init leaves a longer one out."""
ENV_LIMIT = 64 << 10
"""Bytes of the whole env file (render_env's output). The guest ignores a larger file."""
SIZE_KIB = 2048
"""The FAT image: many times ENV_LIMIT plus the CLI's 64 KiB for authorized_keys."""
_LARGE_HINT = "pass large data another way, e.g. fetch it inside the workspace"
ENV_KEY = re.compile(r"^ROCKPOOL_[A-Z0-9_]+$")
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")


def validate_env(env: Mapping[str, str]) -> dict[str, str]:
    """The same rules the guest applies, checked on the host where errors are cheap."""
    for key, value in env.items():
        if not ENV_KEY.fullmatch(key):
            raise InvalidInput(
                f"invalid variable name '{key}': workspace variables are ROCKPOOL_[A-Z0-9_]+"
            )
        if not _PRINTABLE.fullmatch(value):
            raise InvalidInput(f"{key} must be printable ASCII on one line")
        if len(value) > VALUE_LIMIT:  # ASCII: characters are bytes
            raise InvalidInput(
                f"{key} is {len(value)} bytes long, over the limit of {VALUE_LIMIT} bytes "
                "for one workspace variable",
                hint=_LARGE_HINT,
            )
    size = len(render_env(env))  # ASCII, as above
    if size > ENV_LIMIT:
        raise InvalidInput(
            f"the workspace variables make a config disk env file of {size} bytes, over the "
            f"limit of {ENV_LIMIT} bytes ({ENV_LIMIT >> 10} KiB)",
            hint=_LARGE_HINT,
        )
    if "ROCKPOOL_WORKSPACE_NAME" not in env:
        raise InvalidInput("ROCKPOOL_WORKSPACE_NAME is required")
    check_slug(env["ROCKPOOL_WORKSPACE_NAME"], "ROCKPOOL_WORKSPACE_NAME")
    instance = env.get("ROCKPOOL_INSTANCE_ID")
    if instance is not None and not is_instance_id(instance):
        raise InvalidInput(
            f"invalid ROCKPOOL_INSTANCE_ID '{instance}': use 1 to 64 of A-Z, a-z, 0-9, '_' "
            "and '-', starting with a letter or digit"
        )
    return dict(env)


def render_env(env: Mapping[str, str]) -> str:
    return "".join(f"{key}={value}\n" for key, value in sorted(env.items()))


def make_config_disk(
    path: Path, env: Mapping[str, str], authorized_keys: str | None = None, *, validate: bool = True
) -> Path:
    """Write the config disk to path (replacing it atomically).

    validate=False writes env as given; tests use it to check the guest's own checks.
    Invalid input is refused before anything is written.
    """
    content = render_env(validate_env(env) if validate else env)
    tools.require(tools.CONFIG_DISK, "writing a workspace config disk")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    menv = clean_environment({"MTOOLS_SKIP_CHECK": "1"})
    with tempfile.TemporaryDirectory() as scratch:
        env_file = Path(scratch) / "env"
        env_file.write_text(content, encoding="ascii")
        # 0600 from the start: the disk holds every ROCKPOOL_* value.
        run(["mkfs.vfat", "-n", LABEL, "-C", tmp, str(SIZE_KIB)], env=menv, umask=0o077)
        run(["mcopy", "-i", tmp, env_file, "::/env"], env=menv)
        if authorized_keys:
            keys_file = Path(scratch) / "authorized_keys"
            keys_file.write_text(authorized_keys.rstrip("\n") + "\n", encoding="utf-8")
            run(["mcopy", "-i", tmp, keys_file, "::/authorized_keys"], env=menv)
    tmp.replace(path)
    return path

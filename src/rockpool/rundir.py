"""A short, private directory for this user's runtime files: QMP sockets (whose paths
must stay under 108 bytes) and facts that hold until the host reboots."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from rockpool.errors import Conflict


def run_directory() -> Path:
    """/run/rockpool for root, else $XDG_RUNTIME_DIR/rockpool, else /tmp/rockpool-UID;
    created 0700 and refused when another user owns it or can write to it."""
    uid = os.geteuid()
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if uid == 0 and os.access("/run", os.W_OK):
        base = Path("/run/rockpool")
    elif xdg.startswith("/") and Path(xdg).is_dir():
        base = Path(xdg) / "rockpool"
    else:
        base = Path(tempfile.gettempdir()) / f"rockpool-{uid}"
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        info = base.lstat()
    except OSError as exc:
        raise Conflict(f"cannot make the run directory {base}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o022:
        raise Conflict(
            f"the run directory {base} is not a directory of this user's alone",
            hint=f"remove it, or set XDG_RUNTIME_DIR to a private directory: rm -rf {base}",
        )
    return base


def boot_id() -> str:
    """This boot of the host; facts kept under the run directory are valid for it only."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"

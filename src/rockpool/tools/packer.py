"""The `packer` CLI (HashiCorp Packer, macOS: the Packer path's tart-cli builder), and the
environment Packer and the plugin's `tart` run in."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from rockpool.command import clean_environment, run
from rockpool.tools import CLEAN_PATH

# Packer runs `tart` itself (the plugin): both must be on the user's PATH.
TOOLS = ("packer", "tart")
BREW_HINT = "brew install hashicorp/tap/packer cirruslabs/cli/tart"
# Host variables Packer and Tart read; clean_environment drops everything else.
PASSED_VARIABLES = (
    "TART_HOME",
    "PACKER_PLUGIN_PATH",
    "PACKER_CONFIG_DIR",
    "PACKER_CACHE_DIR",
    "PACKER_GITHUB_API_TOKEN",  # `packer init` asks GitHub's API, which rate-limits anonymous use
    "PACKER_LOG",
    "PACKER_LOG_PATH",
    "TMPDIR",
)


def tool_paths() -> dict[str, Path | None]:
    """packer and tart as the user's PATH finds them (Homebrew's bin is not in CLEAN_PATH)."""
    found = {tool: shutil.which(tool) for tool in TOOLS}
    return {tool: Path(path) if path else None for tool, path in found.items()}


def environment() -> dict[str, str]:
    """A clean environment whose PATH finds packer and tart (the plugin runs `tart`)."""
    dirs = [str(path.parent) for path in tool_paths().values() if path is not None]
    passed = {name: os.environ[name] for name in PASSED_VARIABLES if name in os.environ}
    path = ":".join(dict.fromkeys([*dirs, *CLEAN_PATH.split(":")]))
    # CHECKPOINT_DISABLE: no version check against HashiCorp's servers on every run.
    return clean_environment({**passed, "PATH": path, "CHECKPOINT_DISABLE": "1"})


def init(template_dir: Path, *, env: Mapping[str, str], on_line: Callable[[str], None]) -> None:
    """`packer init DIR`: install the plugins the template requires."""
    run(["packer", "init", template_dir], env=env, on_line=on_line)


def build(template_dir: Path, *, env: Mapping[str, str], on_line: Callable[[str], None]) -> None:
    """`packer build DIR`, run in DIR, its output plain and timestamped."""
    run(
        ["packer", "build", "-color=false", "-timestamp-ui", template_dir],
        env=env,
        cwd=template_dir,
        on_line=on_line,
    )

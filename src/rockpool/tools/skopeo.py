"""The `skopeo` CLI: copying an OCI layout to a registry."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from rockpool.command import clean_environment, run

# Registry credentials skopeo reads, passed through from the caller.
AUTH_VARIABLES = ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG")


def copy_layout(
    layout: Path, reference: str, *, insecure: bool, on_line: Callable[[str], None]
) -> None:
    """`skopeo copy --preserve-digests oci:LAYOUT docker://REFERENCE`: the manifest, config
    and layers keep their bytes, media types and annotations. insecure: plain HTTP or
    unverified TLS to the registry (local ones)."""
    env = clean_environment({k: os.environ[k] for k in AUTH_VARIABLES if k in os.environ})
    argv: list[str | Path] = ["skopeo", "copy", "--preserve-digests", "--retry-times", "3"]
    if insecure:
        argv.append("--dest-tls-verify=false")
    run([*argv, f"oci:{layout}", f"docker://{reference}"], env=env, on_line=on_line)

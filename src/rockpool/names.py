"""The naming rules shared by images, workspaces and the guest's init contract."""

from __future__ import annotations

import re

from rockpool.errors import InvalidInput

# A DNS label: the guest's rockpool-init applies the very same rule (images/scripts/setup.sh).
SLUG_PATTERN = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_SLUG = re.compile(rf"^{SLUG_PATTERN}$")
_VERSION_ID = re.compile(r"^[0-9a-f]{12}$")
SLUG_RULE = "1 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-'"


def is_slug(text: str) -> bool:
    return bool(_SLUG.match(text))


def check_slug(text: str, what: str) -> str:
    if not is_slug(text):
        raise InvalidInput(f"invalid {what} '{text}': use {SLUG_RULE}")
    return text


def split_image_ref(ref: str) -> tuple[str, str]:
    """'workspace' or 'workspace:latest' or 'workspace:<version id>' -> (name, version)."""
    name, _, version = ref.partition(":")
    check_slug(name, "image name")
    version = version or "latest"
    if version != "latest" and not _VERSION_ID.match(version):
        raise InvalidInput(
            f"invalid image version '{version}' in '{ref}'",
            hint="use NAME, NAME:latest or NAME:<12-hex-digit version id> (see: rockpool image ls)",
        )
    return name, version

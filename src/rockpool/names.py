"""The naming rules shared by images, workspaces and the guest's init contract, and the
shapes of the ids rockpool writes into its records (checked again when read back)."""

from __future__ import annotations

import re

from rockpool.errors import InvalidInput

# A DNS label: the guest's rockpool-init applies the very same rule (images/scripts/setup.sh).
SLUG_PATTERN = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_SLUG = re.compile(SLUG_PATTERN)
_VERSION_ID = re.compile(r"[0-9a-f]{12}")
# What start writes as ROCKPOOL_INSTANCE_ID: the guest's identity hook checks the same.
INSTANCE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
_INSTANCE_ID = re.compile(INSTANCE_ID_PATTERN)
# Locally administered unicast, as QEMU (52:54:00) and Tart write them.
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
SLUG_RULE = "1 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-'"


def is_slug(text: object) -> bool:
    return isinstance(text, str) and _SLUG.fullmatch(text) is not None


def check_slug(text: str, what: str) -> str:
    if not is_slug(text):
        raise InvalidInput(f"invalid {what} '{text}': use {SLUG_RULE}")
    return text


def is_version_id(text: object) -> bool:
    return isinstance(text, str) and _VERSION_ID.fullmatch(text) is not None


def is_instance_id(text: object) -> bool:
    return isinstance(text, str) and _INSTANCE_ID.fullmatch(text) is not None


def is_mac(text: object) -> bool:
    return isinstance(text, str) and _MAC.fullmatch(text) is not None


def split_image_ref(ref: str) -> tuple[str, str]:
    """'workspace' or 'workspace:latest' or 'workspace:<version id>' -> (name, version)."""
    name, _, version = ref.partition(":")
    check_slug(name, "image name")
    version = version or "latest"
    if version != "latest" and not is_version_id(version):
        raise InvalidInput(
            f"invalid image version '{version}' in '{ref}'",
            hint="use NAME, NAME:latest or NAME:<12-hex-digit version id> (see: rockpool image ls)",
        )
    return name, version

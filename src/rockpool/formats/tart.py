"""tart: a Tart VM bundle (config.json + disk.img) that `rockpool image install --runtime
tart` turns into a local Tart VM on macOS.

nvram.bin, the third file of a Tart VM, is an Apple VZEFIVariableStore that only macOS's
Virtualization framework can create, so the bundle leaves it out; the install step
gets a genuine one from `tart create --linux`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from rockpool.files import link_or_copy
from rockpool.formats.base import FormatJob, Output, OutputFormat
from rockpool.tools.tart import CONFIG, DISK

CONFIG_VERSION = 1
DISPLAY = {"width": 1024, "height": 768}


def mac_address(seed: str) -> str:
    """A locally administered unicast MAC derived from the image, so rebuilds match.

    Tart gives a clone a fresh MAC when the address is already in use on the host.
    """
    octets = bytearray(hashlib.sha256(f"rockpool-mac:{seed}".encode()).digest()[:6])
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{octet:02x}" for octet in octets)


def tart_config(job: FormatJob) -> dict[str, Any]:
    """Tart's VMConfig for a Linux guest with the spec's CPUs and memory, keys in the
    order Tart writes them (Sources/tart/VMConfig.swift)."""
    return {
        "version": CONFIG_VERSION,
        "os": "linux",
        "arch": job.architecture,
        "cpuCountMin": job.cpus,
        "cpuCount": job.cpus,
        "memorySizeMin": job.memory,
        "memorySize": job.memory,
        "macAddress": mac_address(job.identity_seed),
        "display": DISPLAY,
        "diskFormat": "raw",
    }


def config_bytes(job: FormatJob) -> bytes:
    """config.json as Tart itself serializes it: compact, in Tart's key order."""
    return json.dumps(tart_config(job), separators=(",", ":")).encode()


class TartBundleFormat(OutputFormat):
    name = "tart"
    filename = "tart"
    architectures = ("arm64",)

    def write(self, job: FormatJob) -> Output:
        bundle = job.out_dir / self.filename
        bundle.mkdir()
        (bundle / CONFIG).write_bytes(config_bytes(job))
        link_or_copy(job.raw_disk, bundle / DISK)
        return Output(self.name, bundle)
